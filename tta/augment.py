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


def _grey_safe(aug, images: torch.Tensor) -> torch.Tensor:
    """Colour jitter needs RGB: lift single-channel images to three channels and back."""
    rgb = images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images
    out = aug(rgb)
    return out.mean(1, keepdim=True) if images.shape[1] == 1 else out
