"""ImageNet-C and the ImageNet test variants (A, R, V2) from the user's own copies, in their standard layouts.

    ImageNet-C   <root>/<corruption>/<severity>/<wnid>/*.JPEG   (also <root>/<group>/<corruption>/..., as some
                                                                  archives unpack: noise/, blur/, weather/, ...)
    ImageNet-A   <root>/<wnid>/*.jpg       200 of the 1,000 classes
    ImageNet-R   <root>/<wnid>/*.jpg       200 of the 1,000 classes
    ImageNet-V2  <root>/<0..999>/*.jpeg    class folders named by ImageNet index

Labels are ImageNet-1k indices. A and R cover 200 classes; their `class_subset` (the indices of the wnid folders
found) lets an evaluation restrict a 1,000-way prediction to those classes, as their authors do.
Nothing is downloaded here: the messages say where each set comes from.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .images import IMAGE_SUFFIXES

WNID = re.compile(r"n\d{8}")
SOURCES = {
    "imagenet-c": "https://zenodo.org/record/2235448 (Hendrycks & Dietterich; the 5 tar files, ~70 GB)",
    "imagenet-a": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
    "imagenet-r": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
    "imagenet-v2": "https://huggingface.co/datasets/vaishaal/ImageNetV2 (imagenetv2-matched-frequency.tar.gz)",
}


def imagenet_wnids() -> List[str]:
    """The 1,000 ImageNet-1k wnids in index order (shipped with timm, no download)."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(1000)]


def _wnid_index() -> Dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


def class_folder_label(name: str, wnid_index: Optional[Dict[str, int]] = None) -> int:
    """An ImageNet wnid or an integer class index (the layout the corruption cache writes)."""
    if name.isdigit():
        return int(name)
    if WNID.fullmatch(name):
        wnid_index = wnid_index if wnid_index is not None else _wnid_index()
        if name in wnid_index:
            return wnid_index[name]
    raise ValueError(f"class folder {name!r} is neither an ImageNet wnid (n01440764) nor a class index")


def _images_in_class_folders(folder: Path) -> List[Tuple[Path, int]]:
    wnid_index = _wnid_index()
    items: List[Tuple[Path, int]] = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = class_folder_label(d.name, wnid_index)
        items += [(p, label) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


def find_corruption_folder(root, corruption: str, severity: int, what: str = "imagenet-c") -> Path:
    """<root>/<corruption>/<severity>, or <root>/<group>/<corruption>/<severity>; a clear error otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what} root {str(root)!r} does not exist. Expected the ImageNet-C layout "
                                f"<root>/<corruption>/<severity 1-5>/<wnid>/*.JPEG; get it from "
                                f"{SOURCES['imagenet-c']} "
                                "and pass its folder as data.root (or --data-root)")
    candidates = [root / corruption / str(severity)] + sorted(root.glob(f"*/{corruption}/{severity}"))
    for folder in candidates:
        if folder.is_dir():
            return folder
    # Only corruption folders are named: root comes from the user or a benchmark file, and echoing what an
    # arbitrary folder holds (say /etc) would leak its contents into logs.
    from .corruptions import EXTRA, STANDARD
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in STANDARD + EXTRA)
    raise FileNotFoundError(f"{what}: no folder {corruption}/{severity} under {str(root)!r} (corruption folders "
                            f"there: {', '.join(present) or 'none'}). Expected <root>/<corruption>/<severity>/<wnid>/"
                            f"*.JPEG; get ImageNet-C from {SOURCES['imagenet-c']}, or build any -C set on the fly "
                            "with a corruption cache (data.cache)")


def imagenet_c_items(root, corruption: str, severity: int) -> List[Tuple[Path, int]]:
    """(path, ImageNet index) for one corruption and severity of ImageNet-C, sorted by class then file name."""
    folder = find_corruption_folder(root, corruption, severity)
    items = _images_in_class_folders(folder)
    if not items:
        raise ValueError(f"{str(folder)!r} holds no images in class folders; expected <wnid>/*.JPEG inside it "
                         "(is the archive fully extracted?)")
    return items


def imagenet_variant_items(root, variant: str) -> Tuple[List[Tuple[Path, int]], Optional[List[int]]]:
    """(items, class_subset) for ImageNet-A, -R or -V2. The subset of A and R is read from the wnid folders."""
    key = f"imagenet-{variant.lower()}"
    if key not in SOURCES or key == "imagenet-c":
        raise ValueError(f"unknown ImageNet variant {variant!r}; expected a, r or v2")
    root = Path(root).expanduser()
    layout = "<root>/<0..999>/*.jpeg" if key == "imagenet-v2" else "<root>/<wnid>/*.jpg (200 wnid folders)"
    if not root.is_dir():
        raise FileNotFoundError(f"{key} root {str(root)!r} does not exist. Expected {layout}; get it from "
                                f"{SOURCES[key]} and pass its folder as data.root (or --data-root)")
    try:
        items = _images_in_class_folders(root)
    except ValueError as err:
        raise ValueError(f"{key} at {str(root)!r}: {err}. Expected {layout}") from err
    if not items:
        raise ValueError(f"{key}: no images found in class folders under {str(root)!r}; expected {layout}. "
                         f"Get it from {SOURCES[key]}")
    if key == "imagenet-v2":
        return items, None
    subset = sorted({label for _, label in items})
    if len(subset) != 200:
        raise ValueError(f"{key} at {str(root)!r} has {len(subset)} class folders, expected 200 wnid folders; "
                         f"is the archive from {SOURCES[key]} fully extracted?")
    return items, subset
