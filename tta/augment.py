"""Test-time augmentations shared by the methods that average predictions over augmented copies (MEMO, CoTTA).

Inputs are image batches in [0, 1]; torchvision is imported on first use so `import tta` needs only torch.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch


def memo_augment(image: torch.Tensor, n: int, crop: str = "resized") -> torch.Tensor:
    """n AugMix views of one (C, H, W) image after a random crop and flip: torchvision's AugMix (severity 3, 13
    operations with colour ones, black fill); -> (n, C, H, W). `crop` as in memo_augment_official."""
    import torchvision.transforms.v2 as T
    aug = T.Compose([_memo_crop(T, image.shape[-2:], crop), T.RandomHorizontalFlip(), T.AugMix()])
    return torch.stack([aug(image) for _ in range(n)])


MemoCrop = Literal["resized", "pad4"]
MEMO_CROPS = get_args(MemoCrop)


def _memo_crop(T, size, crop: str):
    """MEMO's pre-augmentation crop: a random resized crop (ImageNet) or a 4-pixel padded random crop (CIFAR)."""
    size = tuple(int(v) for v in size)
    return T.RandomResizedCrop(size, antialias=True) if crop == "resized" else T.RandomCrop(size, padding=4)


def memo_augment_official(image: torch.Tensor, n: int, crop: str = "resized", rng=None) -> torch.Tensor:
    """n views of one (C, H, W) image in [0, 1] as the authors' AugMix (zhangmarvin/memo, utils/third_party.py
    _augmix_aug; the same for CIFAR-10 and ImageNet but for the crop): a random crop (`crop`: "resized" is
    RandomResizedCrop, ImageNet; "pad4" is RandomCrop with 4 pixels of padding, CIFAR) and a flip, then a Beta(1, 1)
    mix of that image with a Dirichlet(1, 1, 1) mix of three chains of 1 to 3 operations drawn from nine
    (autocontrast, equalize, rotate, solarize, shear x/y, translate x/y, posterize) at severity 1, on 8-bit PIL
    images. Rotations, shears and translations fill with PIL's fillcolor=128, which on RGB images is (128, 0, 0):
    the authors' code, kept. `rng` is a numpy RandomState (the authors draw from numpy's global one); by default one
    seeded from torch's generator, so torch.manual_seed makes the views reproducible. -> (n, C, H, W)"""
    import numpy as np
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    if rng is None:
        rng = np.random.RandomState(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    pil = TF.to_pil_image((image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8))
    preaugment = T.Compose([_memo_crop(T, image.shape[-2:], crop), T.RandomHorizontalFlip()])
    ops = _pil_ops()
    return torch.stack([_augmix(preaugment(pil), rng, ops) for _ in range(n)]).to(image.device, image.dtype)


def _augmix(x_orig, rng, ops) -> torch.Tensor:
    import numpy as np
    import torchvision.transforms.functional as TF
    x_processed = TF.to_tensor(x_orig)
    w = np.float32(rng.dirichlet([1.0, 1.0, 1.0]))
    m = np.float32(rng.beta(1.0, 1.0))
    mix = torch.zeros_like(x_processed)
    for i in range(3):
        x_aug = x_orig.copy()
        for _ in range(rng.randint(1, 4)):
            x_aug = ops[rng.choice(len(ops))](x_aug, rng)
        mix += w[i] * TF.to_tensor(x_aug)
    return m * x_processed + (1 - m) * mix


def _level(rng) -> float:
    return rng.uniform(low=0.1, high=1)  # severity 1: rand_lvl(1)


def _affine(pil, rng, coefficients):
    from PIL import Image
    return pil.transform(pil.size, Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=128)


def _rotate(pil, rng):
    from PIL import Image
    degrees = int(_level(rng) * 30 / 10)
    if rng.uniform() > 0.5:
        degrees = -degrees
    return pil.rotate(degrees, resample=Image.BILINEAR, fillcolor=128)


def _shear(axis: int):
    def op(pil, rng):
        level = float(_level(rng)) * 0.3 / 10.
        if rng.uniform() > 0.5:
            level = -level
        return _affine(pil, rng, (1, level, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, level, 1, 0))
    return op


def _translate(axis: int):
    def op(pil, rng):
        level = int(_level(rng) * (pil.size[axis] / 3) / 10)
        if rng.random() > 0.5:
            level = -level
        return _affine(pil, rng, (1, 0, level, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, level))
    return op


def _pil_ops():
    """The nine operations of the authors' `augmentations` list, in its order (np.random.choice picks by index)."""
    from PIL import ImageOps
    return [lambda pil, rng: ImageOps.autocontrast(pil),
            lambda pil, rng: ImageOps.equalize(pil),
            _rotate,
            lambda pil, rng: ImageOps.solarize(pil, 256 - int(_level(rng) * 256 / 10)),
            _shear(0), _shear(1), _translate(0), _translate(1),
            lambda pil, rng: ImageOps.posterize(pil, 4 - int(_level(rng) * 4 / 10))]




def check_cotta_size(images: torch.Tensor) -> None:
    """The blur and affine transforms of cotta_augment need images of at least 8x8 pixels."""
    if min(images.shape[-2:]) < 8:
        raise ValueError(f"cotta's augmentations need images of at least 8x8 pixels, got {tuple(images.shape[-2:])}; "
                         "resize the images or use another method")


def cotta_augment(images: torch.Tensor) -> torch.Tensor:
    """One random CoTTA-style view of a batch: colour jitter, affine, blur, flip, small noise, clamped to [0, 1]."""
    import torchvision.transforms.v2 as T
    h = images.shape[-1]
    check_cotta_size(images)
    aug = T.Compose([
        T.ColorJitter(brightness=0.4, contrast=0.3, saturation=0.3, hue=0.06),
        T.RandomAffine(degrees=15, translate=(1 / 16, 1 / 16), scale=(0.9, 1.1)),
        T.GaussianBlur(kernel_size=5 if h >= 64 else 3, sigma=(0.001, 0.5)),
        T.RandomHorizontalFlip(),
    ])
    views = aug(images) if images.shape[1] == 3 else _grey_safe(aug, images)
    return (views + 0.005 * torch.randn_like(views)).clamp(0, 1)


def cotta_augment_official(images: torch.Tensor) -> torch.Tensor:
    """One random view of a batch, as get_tta_transforms of the authors' code (qinenergy/cotta, cifar/ and imagenet/
    cotta.py, soft=False; the same for both): clip; colour jitter with gamma, in a random order (my_transforms.
    ColorJitterPro: brightness and gamma 0.6-1.4 / 0.7-1.3, contrast 0.7-1.3, saturation 0.5-1.5, hue +-0.06); edge
    padding by half the image size, a bilinear affine (+-15 degrees, 1/16 translation, scale 0.9-1.1), a 5x5 blur
    (sigma 0.001-0.5) and a centre crop back to size, so the affine's corners show the image's edges instead of
    black; a flip; noise of std 0.005; clip. The random draws are the authors' in their order."""
    import torchvision.transforms as T
    check_cotta_size(images)
    n = images.shape[-1]
    aug = T.Compose([
        T.Lambda(lambda x: x.clamp(0.0, 1.0)),
        T.Lambda(_color_jitter_pro),
        T.Pad(padding=n // 2, padding_mode="edge"),
        T.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1),
                       interpolation=T.InterpolationMode.BILINEAR),
        T.GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]),
        T.CenterCrop(size=tuple(images.shape[-2:])),
        T.RandomHorizontalFlip(p=0.5),
    ])
    views = aug(images) if images.shape[1] == 3 else _grey_safe(aug, images)
    return (views + 0.005 * torch.randn(views.size()).to(views.device)).clamp(0.0, 1.0)


def _color_jitter_pro(images: torch.Tensor) -> torch.Tensor:
    """my_transforms.ColorJitterPro.forward with the ranges get_tta_transforms gives it (soft=False)."""
    import torchvision.transforms.functional as F
    ranges = ((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3))
    for fn_id in torch.randperm(5).tolist():
        factor = torch.tensor(1.0).uniform_(*ranges[fn_id]).item()
        if fn_id == 0:
            images = F.adjust_brightness(images, factor)
        elif fn_id == 1:
            images = F.adjust_contrast(images, factor)
        elif fn_id == 2:
            images = F.adjust_saturation(images, factor)
        elif fn_id == 3:
            images = F.adjust_hue(images, factor)
        else:
            # gamma after contrast can meet zeros, whose gradient of x ** gamma is not finite (the authors' fix)
            images = F.adjust_gamma(images.clamp(1e-8, 1.0), factor)
    return images


def _grey_safe(aug, images: torch.Tensor) -> torch.Tensor:
    """Colour jitter needs RGB: lift single-channel images to three channels and back."""
    rgb = images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images
    out = aug(rgb)
    return out.mean(1, keepdim=True) if images.shape[1] == 1 else out
