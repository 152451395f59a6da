"""Composed multi-item scenes: Fashion-MNIST items pasted on a small canvas, with per-pixel class masks.

The scene task of the offline quick suite (segmentation with `source` / `diffusion_tta`, object discovery with
`slow_inference`). A scene is a 24x24 black canvas holding two items of *distinct* classes from a 4-class subset
(t-shirt/top, trouser, sneaker, bag), each area-downscaled from 28x28 to 12x12 and pasted at a random position;
the item pasted second occludes the first, and positions are redrawn until each item keeps at least
`min_visible` of its own pixels in view. Item pixels are those brighter than `threshold`.

Ground truth per scene:
  masks      (H, W) long, semantic: 0 background, c + 1 for an item of scene class c (CLASS_NAMES[c + 1])
  instances  (H, W) long: 0 background, 1..k in paste order (for ARI / FG-ARI)
Because the items of a scene have distinct classes, the semantic mask partitions the pixels exactly as the
instance mask does, so ARI computed on either is the same (the benchmark scores slot models on `masks`).

Everything is deterministic for a seed (numpy's default_rng). `train_scenes()` draws items from the full
Fashion-MNIST train split (Debian's dataset-fashion-mnist); `test_scenes()` from the 1,000-image test subset
shipped in the package, so the benchmark needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

FMNIST_CLASSES: Tuple[int, ...] = (0, 1, 7, 8)   # Fashion-MNIST ids of the scene classes: distinct silhouettes
CLASS_NAMES: Tuple[str, ...] = ("background", "t-shirt/top", "trouser", "sneaker", "bag")
CANVAS = 24
ITEM = 12
ITEMS_PER_SCENE = 2


@dataclass
class Scenes:
    images: torch.Tensor        # (N, 1, H, W) float in [0, 1]
    masks: torch.Tensor         # (N, H, W) long: 0 background, c + 1 item of scene class c
    instances: torch.Tensor     # (N, H, W) long: 0 background, 1..k in paste order
    item_classes: torch.Tensor  # (N, k) long: the scene class (0-based, without background) of each item

    def __len__(self) -> int:
        return len(self.images)

    def one_hot(self) -> torch.Tensor:
        """(N, K, H, W) float one-hot of the semantic masks (K = len(CLASS_NAMES)): the judge's training maps."""
        return F.one_hot(self.masks, len(CLASS_NAMES)).permute(0, 3, 1, 2).float()


def select_items(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int] = FMNIST_CLASSES,
                 item: int = ITEM) -> Tuple[torch.Tensor, torch.Tensor]:
    """Items of `classes`, area-downscaled to item x item: (M, item, item) floats and their scene classes (M,)."""
    labels = torch.as_tensor(labels)
    keep = torch.isin(labels, torch.tensor(list(classes)))
    small = F.interpolate(images[keep].float(), size=(item, item), mode="area")[:, 0]
    lookup = {c: i for i, c in enumerate(classes)}
    return small, torch.tensor([lookup[int(c)] for c in labels[keep]], dtype=torch.long)


def compose_scenes(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0, canvas: int = CANVAS,
                   item: int = ITEM, items_per_scene: int = ITEMS_PER_SCENE,
                   classes: Sequence[int] = FMNIST_CLASSES, threshold: float = 0.1, min_visible: float = 0.6,
                   max_tries: int = 50) -> Scenes:
    """`n` scenes from Fashion-MNIST `images` (M, 1, 28, 28) in [0, 1] with their `labels` (M,).

    Each scene: `items_per_scene` items of distinct classes from `classes`, drawn uniformly, pasted in order at
    uniform random positions (later items occlude earlier ones); positions are redrawn (at most `max_tries`
    times) until every item keeps at least `min_visible` of its pixels.
    """
    if items_per_scene > len(classes):
        raise ValueError(f"{items_per_scene} items of distinct classes need at least that many classes, "
                         f"got {len(classes)}")
    if item > canvas:
        raise ValueError(f"items of {item} px do not fit a {canvas} px canvas")
    small, cls = select_items(images, labels, classes, item)
    items = small.numpy()
    fg_all = items > threshold
    by_class = [np.flatnonzero(cls.numpy() == c) for c in range(len(classes))]
    if any(len(b) == 0 for b in by_class):
        raise ValueError(f"the images hold no item of some of the classes {tuple(classes)}")
    rng = np.random.default_rng(seed)
    x = np.zeros((n, canvas, canvas), np.float32)
    inst = np.zeros((n, canvas, canvas), np.int64)
    sem = np.zeros((n, canvas, canvas), np.int64)
    item_classes = np.zeros((n, items_per_scene), np.int64)
    span = canvas - item + 1
    for i in range(n):
        scene_cls = rng.choice(len(classes), items_per_scene, replace=False)
        picks = [by_class[c][rng.integers(len(by_class[c]))] for c in scene_cls]
        for _ in range(max_tries):
            pos = rng.integers(0, span, size=(items_per_scene, 2))
            lab = np.zeros((canvas, canvas), np.int64)
            for j, (p, (oy, ox)) in enumerate(zip(picks, pos)):
                lab[oy:oy + item, ox:ox + item][fg_all[p]] = j + 1
            if all((lab == j + 1).sum() >= min_visible * fg_all[p].sum() for j, p in enumerate(picks)):
                break
        for j, (p, c, (oy, ox)) in enumerate(zip(picks, scene_cls, pos)):
            fg = fg_all[p]
            x[i, oy:oy + item, ox:ox + item][fg] = items[p][fg]
            inst[i, oy:oy + item, ox:ox + item][fg] = j + 1
            sem[i, oy:oy + item, ox:ox + item][fg] = c + 1
        item_classes[i] = scene_cls
    return Scenes(torch.from_numpy(x)[:, None], torch.from_numpy(sem), torch.from_numpy(inst),
                  torch.from_numpy(item_classes))


def train_scenes(n: int = 20000, seed: int = 0, root=None, **kwargs) -> Scenes:
    """Training scenes from the full Fashion-MNIST train split (Debian's dataset-fashion-mnist, or `root`)."""
    from .fashion_mnist import load_fashion_mnist
    images, labels = load_fashion_mnist("train", root=root)
    return compose_scenes(images, labels, n, seed, **kwargs)


def test_scenes(n: int = 200, seed: int = 0, **kwargs) -> Scenes:
    """Test scenes from the 1,000-image Fashion-MNIST test subset shipped in the package (items never seen in
    training: the training scenes use the train split)."""
    from .fashion_mnist_subset import load_subset
    images, labels = load_subset()
    return compose_scenes(images, labels, n, seed, **kwargs)


class SceneDataset(Dataset):
    """(image (1, H, W), semantic mask (H, W) long) pairs, what the benchmark runner expects for segmentation;
    `instances` and `item_classes` stay available as attributes."""

    def __init__(self, scenes: Scenes):
        self.scenes = scenes
        self.instances = scenes.instances
        self.item_classes = scenes.item_classes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int):
        return self.scenes.images[i], self.scenes.masks[i]


def scene_dataset(n: int = 200, seed: int = 0, split: str = "test", root: Optional[str] = None) -> SceneDataset:
    scenes = test_scenes(n, seed) if split == "test" else train_scenes(n, seed, root=root)
    return SceneDataset(scenes)
