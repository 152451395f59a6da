"""Fashion-MNIST members of the zoo: a BN classifier and a class-conditional pixel diffusion judge.

Recipes are seeded and short enough for a 2-core CPU; the figures they print are the ones in the README.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from ..models.weights import load_weights
from ..models.wrapper import ImageModel, standardise_each_image
from .ddpm import log_progress
from .registry import ZooMember, register_member

MEAN, STD = (0.2860,), (0.3530,)
JUDGE_SIZE = 16  # fmnist-judge works at 16x16: four times cheaper than 32x32, classes still tell apart
NATIVE_JUDGE_SIZE = 32  # fmnist-judge32: the 28x28 images resized to 32x32 (three halvings stay whole)


class FashionCNN(nn.Module):
    """Four 3x3 convolutions with batch norm, two poolings, global average pooling, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class PerImageStandardise(nn.Module):
    """Each image shifted to zero mean and scaled to unit standard deviation on its own: blind to brightness and
    contrast. The control for fmnist-judge-std: the same input normalisation without a generative model."""

    def forward(self, x):
        return standardise_each_image(x)


def load_classifier(path: Optional[Path], standardise: bool = False) -> ImageModel:
    net = nn.Sequential(PerImageStandardise(), FashionCNN()) if standardise else FashionCNN()
    if path is not None:
        load_weights(net, path)
    name = "zoo:fmnist-cnn-std" if standardise else "zoo:fmnist-cnn"
    return ImageModel(net, MEAN, STD, CLASS_NAMES, (1, 28, 28), name=name)


def load_standardised_classifier(path: Optional[Path]) -> ImageModel:
    return load_classifier(path, standardise=True)


def load_it3_classifier(path: Optional[Path]):
    """The FashionCNN as f(x, y): y's embedding is added after the first pooling (32 channels)."""
    from ..nets import IT3Net
    model = IT3Net(load_classifier(None), num_outputs=len(CLASS_NAMES), layer="net.features.6", feature_channels=32)
    if path is not None:
        load_weights(model, path)
    return model


def train_classifier(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0,
                     it3: bool = False, standardise: bool = False) -> dict:
    """Adam with a one-cycle schedule (peak 3e-3), batch 128, 2 epochs by default, no augmentation (the
    corruptions must stay unseen). With it3=True the network is trained as IT3's f(x, y) with its own loss; with
    standardise=True it sees each image standardised on its own (PerImageStandardise)."""
    from ..nets import it3_training_loss
    torch.manual_seed(seed)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    model = (load_it3_classifier(None) if it3 else load_classifier(None, standardise)).to(device)
    steps = steps or 2 * math.ceil(len(x) / 128)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        xb, yb = x[idx].to(device), y[idx].to(device)
        loss = it3_training_loss(model, xb, yb, generator=gen) if it3 else F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log_progress(step, steps, start, loss=loss.item())
    model.eval()
    with torch.no_grad():
        acc = sum((model(xt[i:i + 1000].to(device)).argmax(1).cpu() == yt[i:i + 1000]).sum().item()
                  for i in range(0, len(xt), 1000)) / len(xt)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict() if it3 else model.net.state_dict(), out)
    metrics = {"test_accuracy": acc, "steps": steps, "seconds": time.perf_counter() - start}
    print(json.dumps(metrics))
    return metrics


def train_it3_classifier(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0) -> dict:
    return train_classifier(out, steps, device, seed, it3=True)


def train_standardised_classifier(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0) -> dict:
    return train_classifier(out, steps, device, seed, standardise=True)


def build_judge_unet(size: int = JUDGE_SIZE):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                       norm_num_groups=8, num_class_embeds=len(CLASS_NAMES))


def train_judge(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0,
                batch_size: int = 128, save_every: int = 250, resume: bool = False, size: int = JUDGE_SIZE,
                name: str = "fmnist-judge", input_norm: str = "none") -> dict:
    """The shared DDPM recipe (tta.zoo.ddpm), 3000 steps of batch 128 by default, class labels as condition,
    on the clean training split only. The training state is kept beside `out` (`<out>.train-state.pt`) so that
    `resume=True` continues an interrupted run. `input_norm` is written to the judge's tta_backend.json, so the
    judge sees test images normalised as its training images were."""
    from ..generative.base import normalise_judge_input, prepare_images
    from .ddpm import save_judge_folder, train_ddpm, training_state_path
    x, y = load_fashion_mnist("train")
    x = normalise_judge_input(prepare_images(x, (size, size), 1), input_norm)  # the judge's own preprocessing, once
    meta = {"kind": "pixel-unet", "class_names": list(CLASS_NAMES), "data": f"Fashion-MNIST train, {size}x{size}",
            "recipe": f"tta zoo train {name}", **({"input_norm": input_norm} if input_norm != "none" else {})}
    metrics = train_ddpm(
        lambda: build_judge_unet(size), len(x), lambda idx: (x[idx], y[idx].to(device)),
        lambda unet, x_t, t, labels: unet(x_t, t, class_labels=labels).sample,
        lambda ema, scheduler, info: save_judge_folder(ema, scheduler, out, {**meta, "training": info}),
        steps or 3000, batch_size, seed, device, save_every, training_state_path(out), resume)
    print(json.dumps(metrics))
    return metrics


def train_native_judge(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0,
                       resume: bool = False) -> dict:
    """fmnist-judge's recipe unchanged (same UNet, steps, batch, seed) at 32x32 instead of 16x16: the only
    difference between the two judges is the resolution they see."""
    return train_judge(out, steps, device, seed, resume=resume, size=NATIVE_JUDGE_SIZE, name="fmnist-judge32")


def train_standardised_judge(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0,
                             resume: bool = False) -> dict:
    """fmnist-judge's recipe unchanged (16x16, same UNet, steps, batch, seed) on per-image standardised images."""
    return train_judge(out, steps, device, seed, resume=resume, name="fmnist-judge-std", input_norm="per-image")


register_member(ZooMember("fmnist-cnn", "Fashion-MNIST CNN with batch norm (28x28 grey, 10 classes)",
                          train_classifier, load_classifier, "fmnist-cnn.pt"))
register_member(ZooMember("fmnist-cnn-std", "the same CNN on per-image standardised input (fmnist-judge-std's control)",
                          train_standardised_classifier, load_standardised_classifier, "fmnist-cnn-std.pt"))
register_member(ZooMember("fmnist-it3", "the same CNN trained as IT3's f(x, y), y injected after the first pooling",
                          train_it3_classifier, load_it3_classifier, "fmnist-it3.pt"))
register_member(ZooMember("fmnist-judge", "class-conditional pixel diffusion judge for Fashion-MNIST (16x16)",
                          train_judge, None, "fmnist-judge"))
register_member(ZooMember("fmnist-judge32", "the same judge recipe at native resolution (28x28 resized to 32x32)",
                          train_native_judge, None, "fmnist-judge32"))
register_member(ZooMember("fmnist-judge-std", "fmnist-judge's recipe on per-image standardised images (blind to "
                          "brightness and contrast)", train_standardised_judge, None, "fmnist-judge-std"))
