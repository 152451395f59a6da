"""Dense-prediction test sets from the user's own copies: ADE20K (semantic masks) and NYUv2 (depth).

    ADE20K   <root>/ADEChallengeData2016/images/validation/*.jpg
             <root>/ADEChallengeData2016/annotations/validation/*.png   (same stem; 0 = unlabelled, 1..150 = classes)
             (<root> may also be the ADEChallengeData2016 folder itself)
    NYUv2    either <root>/rgb/<id>.{png,jpg} with <root>/depth/<id>.png (16-bit, millimetres) or .npy (metres),
             or DenseDepth's test arrays <root>/eigen_test_rgb.npy (N, 480, 640, 3) uint8 and
             <root>/eigen_test_depth.npy (N, 480, 640) metres, with optional eigen_test_crop.npy [y0, y1, x0, x1]

Images and targets are resized to the model's input size (bilinear for images, nearest for targets), so a batch
stacks; ADE20K labels are shifted to 0..149 with 255 = ignore (the "reduce zero label" convention of Segformer);
depth 0 means "no measurement".
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images import IMAGE_SUFFIXES, load_image

IGNORE_INDEX = 255
ADE20K_SOURCE = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip (923 MB)"
NYUV2_SOURCE = ("DenseDepth's nyu_test.zip (https://github.com/ialhashim/DenseDepth: eigen_test_*.npy), or the "
                "labelled set https://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat "
                "exported to rgb/ and depth/ folders")
NYUV2_LAYOUT = ("<root>/rgb/<id>.png|jpg with <root>/depth/<id>.png (16-bit millimetres) or <id>.npy (metres), or "
                "<root>/eigen_test_rgb.npy and <root>/eigen_test_depth.npy")


def _resize_image(img: torch.Tensor, size) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    out = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp(0, 1)


def _resize_target(target: torch.Tensor, size) -> torch.Tensor:
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[None, None].float(), size=tuple(size), mode="nearest")[0, 0].to(target.dtype)


class ADE20K(Dataset):
    """ADE20K SceneParsing (150 classes): (image (C, H, W) in [0, 1], mask (H, W) int64 with 255 = ignore)."""
    num_classes = 150

    def __init__(self, root, split: str = "validation", input_size=(3, 512, 512)):
        root = Path(root).expanduser()
        base = root if (root / "images").is_dir() and (root / "annotations").is_dir() else root / "ADEChallengeData2016"
        images, masks = base / "images" / split, base / "annotations" / split
        expected = (f"Expected <root>/ADEChallengeData2016/images/{split}/*.jpg and .../annotations/{split}/*.png; "
                    f"get it from {ADE20K_SOURCE}, unzip it and pass the folder as data.root (or --data-root)")
        if not images.is_dir() or not masks.is_dir():
            raise FileNotFoundError(f"ade20k: {str(images)!r} or {str(masks)!r} does not exist. {expected}")
        self.items: List[Tuple[Path, Path]] = []
        for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            mask = masks / f"{img.stem}.png"
            if not mask.is_file():
                raise FileNotFoundError(f"ade20k: image {img.name} has no mask {str(mask)!r}. {expected}")
            self.items.append((img, mask))
        if not self.items:
            raise ValueError(f"ade20k: no images in {str(images)!r}. {expected}")
        self.input_size = tuple(input_size)
        self.targets = None  # segmentation: no per-image class for per-class subsampling

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image
        img_path, mask_path = self.items[i]
        img = _resize_image(load_image(img_path, self.input_size[0]), self.input_size[1:])
        with Image.open(mask_path) as m:
            raw = torch.from_numpy(np.asarray(m, dtype=np.int64).copy())
        if raw.dim() != 2:
            raise ValueError(f"ade20k: mask {str(mask_path)!r} must be a single-channel label image, "
                             f"got shape {tuple(raw.shape)}")
        mask = torch.where(raw == 0, torch.full_like(raw, IGNORE_INDEX), raw - 1)
        return img, _resize_target(mask, self.input_size[1:])


class NYUv2Depth(Dataset):
    """NYUv2 depth: (image (C, H, W) in [0, 1], depth (1, H, W) float32 metres, 0 = no measurement)."""

    def __init__(self, root, input_size=(3, 480, 640), depth_scale: float = 1000.0):
        root = Path(root).expanduser()
        self.input_size = tuple(input_size)
        self.depth_scale = float(depth_scale)
        self.targets = None
        self.arrays: Optional[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = None
        self.items: List[Tuple[Path, Path]] = []
        expected = f"Expected {NYUV2_LAYOUT}; get NYUv2 from {NYUV2_SOURCE} and pass the folder as data.root"
        if not root.is_dir():
            raise FileNotFoundError(f"nyuv2: {str(root)!r} does not exist. {expected}")
        if (root / "eigen_test_rgb.npy").is_file():
            depth_file = root / "eigen_test_depth.npy"
            if not depth_file.is_file():
                raise FileNotFoundError(f"nyuv2: eigen_test_rgb.npy found without eigen_test_depth.npy. {expected}")
            rgb = np.load(root / "eigen_test_rgb.npy", mmap_mode="r")
            depth = np.load(depth_file, mmap_mode="r")
            crop = np.load(root / "eigen_test_crop.npy") if (root / "eigen_test_crop.npy").is_file() else None
            if rgb.ndim != 4 or rgb.shape[-1] != 3 or depth.shape[:3] != rgb.shape[:3]:
                raise ValueError(f"nyuv2: eigen_test_rgb.npy {rgb.shape} and eigen_test_depth.npy {depth.shape} "
                                 f"must be (N, H, W, 3) and (N, H, W). {expected}")
            self.arrays = (rgb, depth, crop)
            return
        rgb_dir, depth_dir = root / "rgb", root / "depth"
        if not rgb_dir.is_dir() or not depth_dir.is_dir():
            raise FileNotFoundError(f"nyuv2: no rgb/ and depth/ folders or eigen_test_*.npy under {str(root)!r}. "
                                    f"{expected}")
        for img in sorted(p for p in rgb_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            for suffix in (".png", ".npy"):
                if (depth_dir / f"{img.stem}{suffix}").is_file():
                    self.items.append((img, depth_dir / f"{img.stem}{suffix}"))
                    break
            else:
                raise FileNotFoundError(f"nyuv2: image {img.name} has no depth/{img.stem}.png or .npy. {expected}")
        if not self.items:
            raise ValueError(f"nyuv2: no images in {str(rgb_dir)!r}. {expected}")

    def __len__(self) -> int:
        return len(self.arrays[0]) if self.arrays is not None else len(self.items)

    def _read(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.arrays is not None:
            rgb, depth, crop = self.arrays
            img = torch.from_numpy(np.array(rgb[i])).permute(2, 0, 1).float() / 255
            d = torch.from_numpy(np.array(depth[i], dtype=np.float32))
            if crop is not None:  # the Eigen crop: only the region the sensor covers reliably is scored
                y0, y1, x0, x1 = (int(v) for v in np.asarray(crop).reshape(-1)[:4])
                keep = torch.zeros_like(d, dtype=torch.bool)
                keep[y0:y1, x0:x1] = True
                d = torch.where(keep, d, torch.zeros_like(d))
            return img, d
        from PIL import Image
        img_path, depth_path = self.items[i]
        img = load_image(img_path, 3)
        if depth_path.suffix == ".npy":
            d = torch.from_numpy(np.load(depth_path).astype(np.float32))
        else:
            with Image.open(depth_path) as m:
                d = torch.from_numpy(np.asarray(m).astype(np.float32) / self.depth_scale)
        if d.dim() != 2:
            raise ValueError(f"nyuv2: depth map {str(depth_path)!r} must be single-channel, got {tuple(d.shape)}")
        return img, d

    def __getitem__(self, i: int):
        img, d = self._read(i)
        if self.input_size[0] == 1:
            img = img.mean(0, keepdim=True)
        return _resize_image(img, self.input_size[1:]), _resize_target(d, self.input_size[1:])[None]
