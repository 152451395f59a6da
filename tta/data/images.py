"""Images from disk: folders of images (with or without class subfolders) and the small named sets shipped
in offline packages. Every image comes out as a float (C, H, W) tensor in [0, 1] at the model's input size."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..models.weights import package_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FOOLBOX_SETS = ("imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST")


def load_image(path, channels: int = 3) -> torch.Tensor:
    """Read one file as a float (C, H, W) tensor in [0, 1]."""
    from PIL import Image
    import numpy as np
    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        arr = np.asarray(im, dtype=np.uint8).copy()
    t = torch.from_numpy(arr)
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    return t.float() / 255


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
                                 f"(e.g. {self.skipped[0]!r})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            img = load_image(path, self.input_size[0])
        except Exception as err:
            raise ValueError(f"cannot read image {str(path)!r} ({err}); fix or remove it, or pass "
                             "on_error='skip' (--on-error skip) to skip unreadable files") from err
        return fit_to_size(img, self.input_size[1:]), label

    @property
    def labelled(self) -> bool:
        return any(label >= 0 for _, label in self.items)


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
    """Images directly in `root` (unlabelled) or in class subfolders root/<class>/* (labelled)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist; pass a folder of images, or one with a "
                                "subfolder per class, or a named set such as foolbox:imagenet")
    flat = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    items = [(p, -1) for p in flat]
    for d in subdirs:
        label = _label_index(d.name, class_names)
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
    else:
        items = image_folder(spec, class_names)
    return ImageList(items, tuple(input_size), list(class_names) if class_names else None, on_error)
