"""Fashion-MNIST (Xiao et al., 2017, MIT licence): 60k train / 10k test grey 28x28 images of 10 clothing classes.

Read from the IDX files that Debian's `dataset-fashion-mnist` package installs, from any folder that holds the
same four files, or (only when asked with download=True) through torchvision, which fetches them from the web.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = ("install Debian's package (as root: apt-get update && apt-get install -y dataset-fashion-mnist, "
              f"which puts them in {DEBIAN_ROOT}), pass root= a folder holding them, or pass download=True to "
              "fetch them with torchvision (needs internet access)")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not): big-endian header, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte, the only type these files use
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}); is it corrupted?")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values but its header says {shape}; the file is truncated")
    return array.reshape(shape)


def _find(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _torchvision_root(root: Optional[Path]) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tta"
    return root if root is not None else cache


def load_fashion_mnist(split: str = "test", root: Optional[Union[str, Path]] = None,
                       download: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float in [0, 1] and labels (N,) int64 of the 'train' or 'test' split.

    Looks in `root` when given, else in Debian's folder; with download=True, missing files are fetched by
    torchvision.datasets.FashionMNIST into `root` (default ~/.cache/tta).
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else DEBIAN_ROOT
    image_stem, label_stem = FILES[split]
    images_path, labels_path = _find(folder, image_stem), _find(folder, label_stem)
    if images_path is None or labels_path is None:
        # torchvision keeps its downloads in <root>/FashionMNIST/raw.
        raw = _torchvision_root(Path(root) if root is not None else None) / "FashionMNIST" / "raw"
        images_path, labels_path = _find(raw, image_stem), _find(raw, label_stem)
    if (images_path is None or labels_path is None) and download:
        from torchvision.datasets import FashionMNIST
        target = _torchvision_root(Path(root) if root is not None else None)
        FashionMNIST(str(target), train=split == "train", download=True)
        raw = target / "FashionMNIST" / "raw"
        images_path, labels_path = _find(raw, image_stem), _find(raw, label_stem)
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"Fashion-MNIST {split} files ({image_stem}.gz, {label_stem}.gz) not found in "
                                f"{folder}; {HOW_TO_GET}")
    images = torch.from_numpy(_read_idx(images_path).copy())
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    if images.dim() != 3 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"unexpected Fashion-MNIST shapes: images {tuple(images.shape)}, labels "
                         f"{tuple(labels.shape)}")
    return images[:, None].float() / 255.0, labels
