"""Any data set becomes a -C benchmark: corruptions applied on the fly (tta.data.corruptions), optionally
cached to disk in the ImageNet-C layout

    <cache>/<corruption>/<severity>/<class index | "images">/<item index>.png

so the second run (and every other method) reads the same corrupted images instead of recomputing them.
PNG is lossless, so a cached image is bit for bit what was computed; the corruption of item i is seeded by
(seed, i), so it does not depend on batch order, subsampling or which process made it.
A manifest.json records what the cache was made from; reusing the folder for other data is an error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .corruptions import SEEDED_BY_ARGUMENT, check_corruption, corrupt_images
from .images import load_image
from .subsample import labels_of

MANIFEST = "manifest.json"
# Version 2: impulse_noise and glass_blur are seeded (before, they differed on every run). A version-1 cache is
# upgraded by deleting those two corruptions' images, which are then recomputed.
CACHE_VERSION = 2


def check_manifest(cache_dir, source: str, input_size, seed: int) -> Path:
    """Create the cache folder's manifest, or check that an existing one describes the same images."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = {"source": source, "input_size": list(input_size), "seed": int(seed), "format": "png",
              "version": CACHE_VERSION}
    path = cache_dir / MANIFEST
    if path.is_file():
        found = _read_manifest(path)
        version = found.get("version", 1)
        if {**found, "version": version} == {**wanted, "version": version} and version < CACHE_VERSION:
            import shutil
            for name in SEEDED_BY_ARGUMENT:  # unseeded in version 1: recompute them
                shutil.rmtree(cache_dir / name, ignore_errors=True)
            found = wanted
            _write_json(path, wanted)
        if found != wanted:
            raise ValueError(f"corruption cache {str(cache_dir)!r} was made for {found}, not {wanted}; use another "
                             "cache folder (data.cache) or delete this one")
    else:
        _write_json(path, wanted)
    return cache_dir


def _read_manifest(path: Path) -> dict:
    """The manifest of a cache folder; a damaged one names the file (what it vouched for is then unknown)."""
    advice = ("the images in that cache folder can no longer be trusted: delete the folder (it is rebuilt on the "
              "next run) or point data.cache at another one")
    try:
        found = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"corruption cache manifest {str(path)!r} is not valid JSON ({err}); {advice}") from None
    if not isinstance(found, dict):
        raise ValueError(f"corruption cache manifest {str(path)!r} holds a JSON {type(found).__name__}, not an "
                         f"object; {advice}")
    return found


def _write_json(path: Path, content) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    arr = arr[..., 0] if arr.shape[2] == 1 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written image that a later run would trust


class CorruptedDataset(Dataset):
    """`base` (yielding (image, target)) with one corruption at one severity applied to every image."""

    def __init__(self, base: Dataset, corruption: str, severity: int, seed: int = 0, cache_dir=None,
                 source: Optional[str] = None, input_size=None):
        check_corruption(corruption, severity)
        self.base, self.corruption, self.severity, self.seed = base, corruption, severity, int(seed)
        self.cache_dir = None
        if cache_dir is not None:
            if source is None or input_size is None:
                raise ValueError("a corruption cache needs `source` (what the images are) and `input_size`")
            self.cache_dir = check_manifest(cache_dir, source, input_size, seed)
        self.targets = labels_of(base)

    def __len__(self) -> int:
        return len(self.base)

    def _path(self, i: int, target) -> Path:
        folder = str(int(target)) if isinstance(target, int) and target >= 0 else \
            "unlabelled" if isinstance(target, int) else "images"
        return self.cache_dir / self.corruption / str(self.severity) / folder / f"{i:07d}.png"

    def __getitem__(self, i: int):
        x, y = self.base[i]
        path = self._path(i, y) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                cached = load_image(path, x.shape[0])
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for a truncated or garbled file
                # Cache files are written atomically, so a damaged one was damaged afterwards (a disk, a copy):
                # say which, rather than silently trust or replace what the cache holds.
                raise ValueError(f"corruption cache file {str(path)!r} is unreadable ({err}); delete it and it is "
                                 "computed again (or delete the whole cache folder if more files are damaged)") from err
            if cached.shape == x.shape:
                return cached, y
        # Seed per item and corruption, so a cached and a recomputed image are the same.
        seed = (self.seed * 1_000_003 + i * 101 + self.severity) % (2 ** 31)
        out = corrupt_images(x[None], self.corruption, self.severity, seed=seed)[0]
        if path is not None:
            _save_png(out, path)
        return out, y
