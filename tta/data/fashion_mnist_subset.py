"""The Fashion-MNIST test subset shipped inside the package, so the quick suite needs nothing else.

`write_subset()` regenerates the file from the full test split (seeded, the first `per_class` images of each
class in a seeded shuffle): `python -c "from tta.data.fashion_mnist_subset import write_subset; write_subset()"`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import torch

SUBSET_FILE = Path(__file__).parent / "fashion_mnist_test_subset.npz"


def write_subset(path: Path = SUBSET_FILE, per_class: int = 100, seed: int = 0, root=None) -> Path:
    from .fashion_mnist import load_fashion_mnist
    images, labels = load_fashion_mnist("test", root=root)
    order = np.random.default_rng(seed).permutation(len(labels))
    keep = np.sort(np.concatenate([order[labels.numpy()[order] == c][:per_class] for c in range(10)]))
    np.savez_compressed(path, images=(images[keep, 0] * 255).round().to(torch.uint8).numpy(),
                        labels=labels[keep].numpy().astype(np.int64), test_indices=keep)
    return path


def load_subset(path: Path = SUBSET_FILE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float in [0, 1] and labels (N,) of the shipped subset."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"the shipped Fashion-MNIST subset {path} is missing; reinstall the package or "
                                "regenerate it with tta.data.fashion_mnist_subset.write_subset()")
    with np.load(path) as f:
        images = torch.from_numpy(f["images"]).float()[:, None] / 255
        labels = torch.from_numpy(f["labels"])
    return images, labels
