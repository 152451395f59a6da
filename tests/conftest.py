"""Tiny models and batches shared by the tests (CPU, offline, seconds)."""
import pytest
import torch
from torch import nn

import tta


class TinyNet(nn.Module):
    """A small BN + GN + LN classifier or segmenter; `sharpness` scales the logits so that entropy filters
    (EATA, SAR) keep samples."""

    def __init__(self, num_classes=5, dense=False, sharpness=1.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.dense = dense
        self.head = nn.Conv2d(8, num_classes, 1) if dense else nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, num_classes))
        self.sharpness = sharpness

    def forward(self, x):
        return self.sharpness * self.head(self.features(x))


def tiny_model(num_classes=5, dense=False, sharpness=1.0, seed=0, task=None):
    torch.manual_seed(seed)
    net = TinyNet(num_classes, dense, sharpness)
    task = task or ("segmentation" if dense else "classification")
    return tta.wrap_model(net, class_names=[f"c{i}" for i in range(num_classes)], input_size=(3, 16, 16), task=task)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(8, 3, 16, 16)


# Keep augmentation-heavy methods cheap in the tests.
FAST = {"memo": {"n_augmentations": 4}, "cotta": {"n_augmentations": 2}}
