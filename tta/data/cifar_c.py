"""CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich 2019) in their distributed .npy layout:

    <root>/<corruption>.npy   uint8 (50000, 32, 32, 3): severities 1..5, 10,000 test images each, in order
    <root>/labels.npy         (50000,) class indices (the 10,000 test labels repeated 5 times)

Nothing is downloaded here: the messages say where the archives are.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .corruptions import check_corruption
from .images import fit_to_size

PER_SEVERITY = 10_000
SOURCES = {
    "cifar10": "https://zenodo.org/record/2535967 (CIFAR-10-C.tar, 2.9 GB)",
    "cifar100": "https://zenodo.org/record/3555552 (CIFAR-100-C.tar, 2.9 GB)",
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm"]
CLASS_NAMES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


def _expected(root: Path, which: str) -> str:
    return (f"Expected the CIFAR-C layout {str(root)!r}/<corruption>.npy (uint8, 50000 x 32 x 32 x 3) and labels.npy; "
            f"get {which.upper().replace('CIFAR', 'CIFAR-')}-C from {SOURCES[which]} and pass the extracted folder "
            "as data.root (or --data-root)")


class CIFARC(Dataset):
    """One corruption at one severity: 10,000 (image, label) pairs, images resized to `input_size`.
    The arrays are memory-mapped, so opening all 15 corruptions costs no memory."""

    def __init__(self, root, corruption: str, severity: int, input_size=(3, 32, 32), which: str = "cifar10"):
        check_corruption(corruption, severity)
        if which not in SOURCES:
            raise ValueError(f"which must be one of {', '.join(SOURCES)}, got {which!r}")
        root = Path(root).expanduser()
        data_file, label_file = root / f"{corruption}.npy", root / "labels.npy"
        for f in (data_file, label_file):
            if not f.is_file():
                raise FileNotFoundError(f"{which}-c: {str(f)!r} is missing. {_expected(root, which)}")
        try:
            data = np.load(data_file, mmap_mode="r")
            labels = np.load(label_file, mmap_mode="r")
        except ValueError as err:
            raise ValueError(f"{which}-c: cannot read {str(data_file)!r} or labels.npy as .npy arrays ({err}); "
                             f"re-extract the archive. {_expected(root, which)}") from err
        if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.shape[0] % PER_SEVERITY or data.dtype != np.uint8:
            raise ValueError(f"{which}-c: {str(data_file)!r} has shape {data.shape} and dtype {data.dtype}; "
                             f"{_expected(root, which)}")
        if labels.shape[0] != data.shape[0]:
            raise ValueError(f"{which}-c: labels.npy has {labels.shape[0]} labels for {data.shape[0]} images")
        if data.shape[0] < severity * PER_SEVERITY:
            raise ValueError(f"{which}-c: {str(data_file)!r} holds {data.shape[0] // PER_SEVERITY} severities, "
                             f"severity {severity} was asked for")
        lo = (severity - 1) * PER_SEVERITY
        self.images = data[lo: lo + PER_SEVERITY]
        self.targets: List[int] = [int(v) for v in labels[lo: lo + PER_SEVERITY]]
        self.input_size = tuple(input_size)
        self.class_names = CLASS_NAMES[which]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1).float() / 255
        if self.input_size[0] == 1:
            img = img.mean(0, keepdim=True)
        return fit_to_size(img, self.input_size[1:]), self.targets[i]
