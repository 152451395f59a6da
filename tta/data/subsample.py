"""Seeded per-class subsampling: the papers evaluate 3 to 5 images per class rather than whole test sets."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np


def per_class_indices(labels: Sequence[int], per_class: Optional[int], seed: int = 0) -> List[int]:
    """Indices of at most `per_class` examples of every class, drawn with `seed`, in their original order.

    The draw depends only on the labels and the seed, so parallel lists (the same images under every
    corruption of ImageNet-C or CIFAR-C) give the same images in every domain. `per_class=None` keeps all.
    Unlabelled examples (label < 0) are kept only when nothing is subsampled."""
    if per_class is None:
        return list(range(len(labels)))
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer or None (all images), got {per_class!r}")
    by_class: Dict[int, List[int]] = {}
    for i, label in enumerate(labels):
        if int(label) >= 0:
            by_class.setdefault(int(label), []).append(i)
    if not by_class:
        raise ValueError("per-class subsampling needs labelled images; these have no labels (set per_class: null)")
    rng = np.random.default_rng(seed)
    keep: List[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) <= per_class:
            keep += members
        else:
            keep += [members[j] for j in rng.choice(len(members), per_class, replace=False)]
    return sorted(keep)


def labels_of(dataset) -> Optional[Sequence[int]]:
    """Per-image class labels without reading images: `targets` (our sets, torchvision's CIFAR), or the labels
    of an `items` list of (path, label); None where the set has none (dense tasks)."""
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "items"):
        items = dataset.items
        if items and isinstance(items[0], tuple) and isinstance(items[0][1], int):
            targets = [label for _, label in items]
    return targets
