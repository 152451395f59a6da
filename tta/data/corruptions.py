"""ImageNet-C style corruptions (Hendrycks & Dietterich, ICLR 2019) through the maintained
`imagecorruptions-imaug` library: the 15 standard corruptions plus 4 extra, severities 1 to 5."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import numpy as np
import torch

from ..registry import unknown_name_message

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
            "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
MIN_SIZE = 32  # the smallest side imagecorruptions accepts
# These two draw from a fresh generator seeded by their `seed` argument, not from numpy's global one, so they are
# only reproducible when given a seed (corrupt_images gives each image one).
SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")


def corruption_names(which: str = "standard") -> List[str]:
    """'standard' (15), 'extra' (4) or 'all' (19)."""
    groups = {"standard": STANDARD, "extra": EXTRA, "all": STANDARD + EXTRA}
    if which not in groups:
        raise KeyError(unknown_name_message("corruption group", which, groups))
    return list(groups[which])


def check_corruption(name: str, severity: int) -> None:
    if name not in STANDARD + EXTRA:
        raise KeyError(unknown_name_message("corruption", name, STANDARD + EXTRA))
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")


def corrupt_array(image: np.ndarray, name: str, severity: int, seed: Optional[int] = None) -> np.ndarray:
    """One uint8 (H, W, 3) or (H, W) image -> corrupted uint8 image of the same shape. `seed` seeds the corruptions
    that do not draw from numpy's global generator (SEEDED_BY_ARGUMENT); the others ignore it."""
    from imagecorruptions import corrupt
    check_corruption(name, severity)
    grey = image.ndim == 2
    rgb = np.repeat(image[..., None], 3, axis=2) if grey else image
    h, w = rgb.shape[:2]
    # The library refuses images under 32 px (MNIST-sized thumbnails): corrupt an edge-padded copy, crop back.
    top, left = max(0, (MIN_SIZE - h + 1) // 2), max(0, (MIN_SIZE - w + 1) // 2)
    if top or left:
        rgb = np.pad(rgb, ((top, max(0, MIN_SIZE - h - top)), (left, max(0, MIN_SIZE - w - left)), (0, 0)), mode="edge")
    extra = {"seed": seed} if name in SEEDED_BY_ARGUMENT else {}
    out = np.asarray(corrupt(rgb, severity=severity, corruption_name=name, **extra))
    out = np.clip(out, 0, 255).astype(np.uint8)[top: top + h, left: left + w]
    return out.mean(axis=2).round().astype(np.uint8) if grey else out


def corrupt_images(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A (B, C, H, W) batch in [0, 1] -> its corrupted copy. Seeded: the same call gives the same images."""
    check_corruption(name, severity)
    out = []
    with numpy_global_seed(seed):
        for img in images.detach().cpu():
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            arr = arr[..., 0] if arr.shape[2] == 1 else arr
            # Drawn only for the corruptions that take a seed, so the others' global-generator draws are unchanged.
            own_seed = int(np.random.randint(2 ** 31)) if name in SEEDED_BY_ARGUMENT else None
            res = torch.from_numpy(corrupt_array(arr, name, severity, own_seed))
            res = res[None] if res.dim() == 2 else res.permute(2, 0, 1)
            out.append(res.float() / 255)
    return torch.stack(out).to(images.device)


@contextlib.contextmanager
def numpy_global_seed(seed: int) -> Iterator[None]:
    """numpy's global generator seeded with `seed` inside the block, and put back as it was on exit.

    imagecorruptions draws its noise from numpy's global generator and takes no generator of its own, so the only
    way to seed it is to seed that one; putting it back leaves the caller's own numpy draws as they would have been
    without the corruption. (A local Generator would change every corrupted image, and the committed results and
    corruption caches depend on them bit for bit.)"""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
