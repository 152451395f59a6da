"""Test-time augmentations shared by the methods that average predictions over augmented copies (MEMO, CoTTA).

Inputs are image batches in [0, 1]; torchvision is imported on first use so `import tta` needs only torch.
"""
from __future__ import annotations

import torch


def memo_augment(image: torch.Tensor, n: int) -> torch.Tensor:
    """n AugMix views of one (C, H, W) image after a random resized crop and flip, as in MEMO; -> (n, C, H, W)."""
    import torchvision.transforms.v2 as T
    size = image.shape[-2:]
    aug = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.AugMix()])
    return torch.stack([aug(image) for _ in range(n)])


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
