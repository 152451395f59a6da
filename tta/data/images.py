"""Images from disk: folders of images (with or without class subfolders) and the small named sets shipped
in offline packages. Every image comes out as a float (C, H, W) tensor in [0, 1] at the model's input size."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.weights import package_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FOOLBOX_SETS = ("imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST")


def load_image(path, channels: int = 3) -> torch.Tensor:
    """Read one file as a float (C, H, W) tensor in [0, 1], at the file's own precision: 8-bit images are divided
    by 255, 16-bit ones (PNG, TIFF) by 65535, and float images (TIFF) are taken to hold values in [0, 1] already,
    as numpy and tifffile write them from [0, 1] arrays. Float images outside [0, 1] and 32-bit integer images
    (which have no standard white level) are refused with a ValueError naming the file."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in HIGH_PRECISION_MODES or im.mode.startswith("I;16"):
            arr = _high_precision(im, path)
        else:
            # convert() is exact for 8-bit modes; on I;16, I and F it clips to 0..255 (a 16-bit grey image
            # comes out nearly binary), hence the separate path above.
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.uint8).astype(np.float32) / 255
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 2:
        t = t[None].expand(3, -1, -1).clone() if channels == 3 else t[None]
    else:
        t = t.permute(2, 0, 1)
    return t.float()


HIGH_PRECISION_MODES = ("I", "F")  # PIL's 32-bit integer and float modes; the I;16* modes are matched by prefix


class ImageFormatError(ValueError):
    """A file that opens as an image but holds pixels tta does not scale to [0, 1] without guessing."""


def _high_precision(im, path) -> np.ndarray:
    """The pixels of a single-channel 16-bit, 32-bit integer or float image as float32 in [0, 1]."""
    arr = np.asarray(im)
    where = f"image '{printable(path)}' (mode {im.mode})"
    if arr.dtype.kind == "u":
        return arr.astype(np.float32) / np.iinfo(arr.dtype).max
    if arr.dtype.kind == "i":
        if im.mode == "I" and im.format in ("PNG", "PPM"):
            # 16-bit data in mode I: Pillow scales a PGM file of any maxval above 255 to 0..65535, and Pillow < 10
            # reads a 16-bit grey PNG as mode I
            return arr.astype(np.float32) / 65535
        if im.mode.startswith("I;16") and arr.min() >= 0:  # signed 16-bit: the positive half is the range
            return arr.astype(np.float32) / np.iinfo(arr.dtype).max
        raise ImageFormatError(f"{where} has signed {8 * arr.dtype.itemsize}-bit integer pixels (values "
                         f"{arr.min()}..{arr.max()}), which have no standard white level to scale by; save it as an "
                         "8- or 16-bit PNG/TIFF, or as a float TIFF with values in [0, 1]")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageFormatError(f"{where} contains NaN or inf pixels; clean the file or remove it")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:  # the tolerance check_images allows for rounding
            raise ImageFormatError(f"{where} has float pixels in [{lo:.4g}, {hi:.4g}], but float images are read as "
                             "values in [0, 1]; rescale it to [0, 1] before saving (e.g. divide by its maximum "
                             "value), or save it as an 8- or 16-bit PNG/TIFF")
        return np.clip(arr, 0, 1).astype(np.float32)
    raise ImageFormatError(f"{where} has pixels of type {arr.dtype}, which tta cannot read; save it as an 8- or 16-bit "
                     "PNG/TIFF")


def printable(path) -> str:
    """A file name safe to print on any terminal: bytes that are not UTF-8 (Linux names may hold any byte) become
    \\xNN escapes and control characters their escapes, instead of a UnicodeEncodeError in the middle of a run."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def fit_to_size(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize to the model's input size. Large inputs follow the ImageNet evaluation protocol (shorter side to
    size / 0.875, centre crop); small ones (thumbnails such as CIFAR or MNIST) are resized directly."""
    import torchvision.transforms.v2.functional as F
    h, w = size
    if image.shape[-2:] == (h, w):
        return image
    if min(h, w) >= 128 and min(image.shape[-2:]) > min(h, w):
        image = F.resize(image, [int(round(min(h, w) / 0.875))], antialias=True)
        return F.center_crop(image, [h, w]).clamp(0, 1)
    return F.resize(image, [h, w], antialias=True).clamp(0, 1)


@dataclass
class ImageList(Dataset):
    """(path, label) pairs -> (image, label) with label -1 where unknown. Unreadable files raise naming the file,
    or with on_error="skip" are read once up front, dropped from the list and named in `skipped` (each once), so
    no image is counted twice and len() is the number of images actually evaluated."""
    items: List[Tuple[Path, int]]
    input_size: Tuple[int, int, int] = (3, 224, 224)
    class_names: Optional[List[str]] = None
    on_error: str = "raise"
    skipped: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if not self.items:
            raise ValueError("the image list is empty")
        if self.on_error == "skip":
            readable = []
            for path, label in self.items:
                try:
                    load_image(path, self.input_size[0])
                    readable.append((path, label))
                except Exception:
                    self.skipped.append(str(path))
            self.items = readable
            if not self.items:
                raise ValueError(f"none of the {len(self.skipped)} image file(s) is readable "
                                 f"(e.g. '{printable(self.skipped[0])}')")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            img = load_image(path, self.input_size[0])
        except ImageFormatError as err:  # already names the file and says how to convert it
            raise ValueError(f"{err}; or pass on_error='skip' (--on-error skip) to skip such files") from err
        except Exception as err:
            raise ValueError(f"cannot read image '{printable(path)}' ({err}); fix or remove it, or pass "
                             "on_error='skip' (--on-error skip) to skip unreadable files") from err
        return fit_to_size(img, self.input_size[1:]), label

    @property
    def labelled(self) -> bool:
        return any(label >= 0 for _, label in self.items)

    def skipped_summary(self, shown: int = 5) -> str:
        """"skipped N unreadable file(s): a, b, ..." naming the first `shown`, each escaped for any terminal."""
        names = ", ".join(printable(p) for p in self.skipped[:shown])
        more = f" and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"skipped {len(self.skipped)} unreadable file(s): {names}{more}"


def _label_index(folder_name: str, class_names: Optional[Sequence[str]]) -> int:
    """Map a class folder name to a model class index: an integer, a class name, or an ImageNet wnid."""
    if folder_name.isdigit():
        return int(folder_name)
    if class_names:
        lowered = [c.lower().replace(" ", "_") for c in class_names]
        key = folder_name.lower().replace(" ", "_")
        if key in lowered:
            return lowered.index(key)
    if re.fullmatch(r"n\d{8}", folder_name) and class_names is not None and len(class_names) == 1000:
        from timm.data import ImageNetInfo
        return ImageNetInfo().label_name_to_index(folder_name)
    raise ValueError(f"class folder {folder_name!r} matches none of the model's class names; name class folders "
                     "by class index (0, 1, ...), by class name, or by ImageNet wnid")


def image_folder(root, class_names: Optional[Sequence[str]] = None) -> List[Tuple[Path, int]]:
    """Images directly in `root` (unlabelled) or in class subfolders root/<class>/* (labelled). With the model's
    `class_names`, a class folder beyond them (999/ for a 10-class model) is refused: its images would silently
    count as wrong predictions."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist; pass a folder of images, or one with a "
                                "subfolder per class, or a named set such as foolbox:imagenet")
    flat = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    items = [(p, -1) for p in flat]
    for d in subdirs:
        label = _label_index(d.name, class_names)
        if class_names is not None and label >= len(class_names):
            raise ValueError(f"class folder '{printable(d)}' stands for class index {label}, but the model has "
                             f"{len(class_names)} classes (0 to {len(class_names) - 1}); remove or rename the folder, "
                             "or use a model with that class")
        items += [(p, label) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {str(root)!r}")
    return items


def foolbox_images(name: str) -> List[Tuple[Path, int]]:
    """The 20 sample images per data set shipped in the PyPI package foolbox (label in the file name)."""
    if name not in FOOLBOX_SETS:
        from ..registry import unknown_name_message
        raise KeyError(unknown_name_message("foolbox set", name, FOOLBOX_SETS))
    root = package_dir("foolbox")
    if root is None:
        raise FileNotFoundError("the foolbox sample images come from the PyPI package foolbox: "
                                "pip install --no-deps foolbox")
    items = []
    for p in sorted((root / "data").glob(f"{name}_*")):
        m = re.fullmatch(rf"{re.escape(name)}_(\d+)_(\d+)\.\w+", p.name)
        if m:
            items.append((p, int(m.group(2))))
    return items


def open_images(spec: str, input_size=(3, 224, 224), class_names=None, on_error: str = "raise") -> ImageList:
    """`foolbox:<set>` or a folder path -> an ImageList sized for the model."""
    if spec.startswith("foolbox:"):
        items = foolbox_images(spec.split(":", 1)[1])
        top = max((label for _, label in items), default=-1)
        if class_names is not None and top >= len(class_names):
            raise ValueError(f"{spec} has labels up to {top}, but the model has {len(class_names)} classes; use a "
                             f"model trained on {spec.split(':', 1)[1]}")
    else:
        items = image_folder(spec, class_names)
    return ImageList(items, tuple(input_size), list(class_names) if class_names else None, on_error)
