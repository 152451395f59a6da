"""Clean images a method asks for before it sees test data: EATA's Fisher information (`fisher_data`).

The authors' main.py (mr-eggplant/EATA) estimates it on 2,000 clean ImageNet validation images, drawn at random and
read in batches of the test batch size, with batch-norm layers on batch statistics as during adaptation; the TTA
zoo (mariodoebler/test-time-adaptation) on 2,000 images of the source training set. Here `fisher_data: clean` takes
the benchmark's own uncorrupted split (the kinds that corrupt on the fly have one; ImageNet-C and CIFAR-10-C files
do not) and any other value is a folder of clean images (~ and $VARS expand, so a benchmark file can name
`$IMAGENET_VAL` and keep its result ids free of machine paths). `tta run` takes the same path, with "clean"
meaning its test images before their --corruption.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional, TextIO, Union

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from .datasets import BuildContext, DataConfig, build_domains
from .fields import expand_path

# Kinds whose files hold only corrupted images: "clean" cannot mean anything for them.
NO_CLEAN_SPLIT = {"imagenet-c": "EATA's paper used 2,000 clean ImageNet validation images (a folder of class "
                                "folders, e.g. fisher_data: $IMAGENET_VAL)",
                  "cifar-c": "the TTA zoo used 2,000 clean CIFAR-10 training images (a folder of class folders, "
                             "e.g. fisher_data: $CIFAR10_TRAIN)"}


def clean_images(fisher_data: str, data: Union[DataConfig, Dataset, None], ctx: BuildContext) -> Dataset:
    """The images `fisher_data` names: a folder, or for "clean" the clean split of the benchmark's data (a
    DataConfig) or the given uncorrupted images themselves (tta run's stream before its corruption)."""
    if fisher_data == "clean" and isinstance(data, Dataset):
        return data
    if fisher_data == "clean" and data is None:
        raise ValueError("fisher_data: clean takes the uncorrupted version of the test images, and these have "
                         "none (they are not corrupted on the fly); give fisher_data a folder of clean images")
    if fisher_data == "clean":
        if data.kind in NO_CLEAN_SPLIT:
            raise ValueError(f"fisher_data: clean takes the uncorrupted split of the benchmark's data, and data kind "
                             f"{data.kind!r} has none; give fisher_data a folder of clean images instead: "
                             f"{NO_CLEAN_SPLIT[data.kind]}")
        whole = dataclasses.replace(data, corruptions=None, clean=True, per_class=None, max_images=None)
        domains = [d for d in build_domains(whole, dataclasses.replace(ctx, limit=None)) if d.severity is None]
        if not domains:
            raise ValueError(f"data kind {data.kind!r} gave no clean split for fisher_data: clean; give a folder of "
                             "clean images instead")
        return domains[0].dataset if len(domains) == 1 else ConcatDataset([d.dataset for d in domains])
    from ..data.images import open_images
    root = expand_path(fisher_data, "fisher_data", "or give fisher_data: clean")
    if not root.is_dir():
        raise ValueError(f"fisher_data {fisher_data!r} is not a folder ({root}); give a folder of clean images (or "
                         "one with a subfolder per class), or fisher_data: clean for the benchmark's clean split")
    return open_images(str(root), ctx.input_size, ctx.class_names, ctx.on_error)


def prepare_adapter(adapter, data: Union[DataConfig, Dataset, None], batch_size: int, seed: int, device,
                    download: bool = False, on_error: str = "raise", num_workers: int = 0, label: Optional[str] = None,
                    out: Optional[TextIO] = None):
    """Run the source-data steps `adapter`'s config asks for (EATA's Fisher information) and print whether its
    Fisher regulariser is on (to `out`, stderr by default); returns the adapter. `data` is what fisher_data: clean
    means (see clean_images)."""
    out = out or sys.stderr
    cfg = adapter.cfg
    if not hasattr(cfg, "fisher_data"):
        return adapter
    name = label or adapter.name
    if cfg.fisher_data is None:
        print(f"{name}: Fisher regulariser off: no fisher_data, so it runs as ETA (EATA without it; its config "
              "records fisher_data: null)", file=out)
        return adapter
    model = adapter.model
    ctx = BuildContext(tuple(model.input_size), getattr(model, "class_names", None), download, None, on_error)
    images = clean_images(cfg.fisher_data, data, ctx)
    adapter.compute_fisher(x.to(device) for x in fisher_batches(images, cfg.fisher_size, batch_size, seed,
                                                                 num_workers))
    n = min(cfg.fisher_size, len(images))
    short = "" if n == cfg.fisher_size else f" (all there are; fisher_size asks for {cfg.fisher_size})"
    print(f"{name}: Fisher regulariser on: Fisher information from {n} clean images of {cfg.fisher_data}{short}",
          file=out)
    return adapter


def fisher_batches(images: Dataset, n: int, batch_size: int, seed: int = 0, num_workers: int = 0):
    """Batches of a seeded random subset of n images in a seeded order (the authors shuffle a random subset): what
    tta bench gives EATA's compute_fisher, for Python API users who want the same draw."""
    order = np.random.default_rng([seed, 4]).permutation(len(images))[:n].tolist()
    for x, _ in DataLoader(Subset(images, order), batch_size=batch_size, shuffle=False, num_workers=num_workers):
        yield torch.as_tensor(x)
