"""The zero-shot classification sets of CLIP and Diffusion-TTA, read through torchvision's dataset classes
from local roots, with class names and prompt templates.

Nothing is downloaded unless `download=True` (the CLI's `--download`): a missing set is an error that says which
folder torchvision expects under the root and where the files come from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import unknown_name_message
from .images import fit_to_size

# CLIP's prompt templates per data set (Radford et al. 2021, the prompt engineering notebook); Diffusion-TTA uses
# the single template "a photo of a {}." for its Stable Diffusion condition.
SINGLE_TEMPLATE = ("a photo of a {}.",)
_CIFAR_TEMPLATES = tuple(
    f"a {q}photo of {a} {{}}." for a in ("a", "the")
    for q in ("", "blurry ", "black and white ", "low contrast ", "high contrast ", "bad ", "good "))
_CIFAR_TEMPLATES = _CIFAR_TEMPLATES + ("a photo of a small {}.", "a photo of a big {}.",
                                       "a photo of the small {}.", "a photo of the big {}.")


@dataclass(frozen=True)
class ZeroShotSet:
    torchvision_class: str
    split_kwargs: Dict[str, object]
    layout: str                    # what torchvision looks for under the root
    source: str                    # where the files come from
    templates: Tuple[str, ...]
    labels_attr: str               # where torchvision keeps the labels (for per-class subsampling)


ZEROSHOT_SETS: Dict[str, ZeroShotSet] = {
    "cifar10": ZeroShotSet("CIFAR10", {"train": False}, "<root>/cifar-10-batches-py/",
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", _CIFAR_TEMPLATES, "targets"),
    "cifar100": ZeroShotSet("CIFAR100", {"train": False}, "<root>/cifar-100-python/",
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", _CIFAR_TEMPLATES, "targets"),
    "food101": ZeroShotSet("Food101", {"split": "test"}, "<root>/food-101/{images,meta}/",
                           "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz (5 GB)",
                           ("a photo of {}, a type of food.",), "_labels"),
    "oxford_pets": ZeroShotSet("OxfordIIITPet", {"split": "test"}, "<root>/oxford-iiit-pet/{images,annotations}/",
                               "https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz, annotations.tar.gz)",
                               ("a photo of a {}, a type of pet.",), "_labels"),
    "flowers102": ZeroShotSet("Flowers102", {"split": "test"},
                              "<root>/flowers-102/{jpg/, imagelabels.mat, setid.mat} (reading .mat needs scipy)",
                              "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
                              ("a photo of a {}, a type of flower.",), "_labels"),
    "fgvc_aircraft": ZeroShotSet("FGVCAircraft", {"split": "test", "annotation_level": "variant"},
                                 "<root>/fgvc-aircraft-2013b/data/",
                                 "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)",
                                 ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
                                 "_labels"),
    "stl10": ZeroShotSet("STL10", {"split": "test"}, "<root>/stl10_binary/",
                         "https://cs.stanford.edu/~acoates/stl10/ (stl10_binary.tar.gz)",
                         ("a photo of a {}.", "a photo of the {}."), "labels"),
}


def zeroshot_names() -> List[str]:
    return sorted(ZEROSHOT_SETS)


def clean_class_name(name: str) -> str:
    """torchvision's folder-style names ("apple_pie") -> prompt words ("apple pie"); case is kept (aircraft
    variants such as "A300B4" are names, not words)."""
    return name.replace("_", " ").strip()


def templates_for(name: str, which="clip") -> Tuple[str, ...]:
    """'clip' (the paper's per-set ensemble), 'single' ("a photo of a {}.") or an explicit list of templates."""
    if isinstance(which, (list, tuple)):
        bad = [t for t in which if "{}" not in t]
        if bad or not which:
            raise ValueError(f"prompt templates need a '{{}}' where the class name goes; got {list(which)!r}")
        return tuple(which)
    if which == "single":
        return SINGLE_TEMPLATE
    if which == "clip":
        return get_set(name).templates
    raise ValueError(f"templates must be 'clip', 'single' or a list of strings with '{{}}', got {which!r}")


def get_set(name: str) -> ZeroShotSet:
    if name not in ZEROSHOT_SETS:
        raise KeyError(unknown_name_message("zero-shot data set", name, zeroshot_names()))
    return ZEROSHOT_SETS[name]


class TorchvisionImages(Dataset):
    """A torchvision classification set (PIL images) as (float image in [0, 1] at `input_size`, label)."""

    def __init__(self, dataset, input_size=(3, 224, 224), labels: Sequence[int] = (), class_names=None):
        self.dataset = dataset
        self.input_size = tuple(input_size)
        self.targets = [int(v) for v in labels]
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label = self.dataset[i]
        arr = np.asarray(img.convert("RGB" if self.input_size[0] == 3 else "L"), dtype=np.uint8).copy()
        t = torch.from_numpy(arr)
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        return fit_to_size(t.float() / 255, self.input_size[1:]), int(label)


def open_zeroshot(name: str, root, input_size=(3, 224, 224), download: bool = False,
                  constructor: Callable = None) -> TorchvisionImages:
    """The test split of zero-shot set `name` under `root`; `download=True` lets torchvision fetch it."""
    import torchvision.datasets
    spec = get_set(name)
    cls = constructor or getattr(torchvision.datasets, spec.torchvision_class)
    try:
        ds = cls(root=str(root), download=download, **spec.split_kwargs)
    except RuntimeError as err:
        if download:
            raise
        raise FileNotFoundError(
            f"zero-shot set {name!r} not found under {str(root)!r} ({err}). torchvision expects {spec.layout}; "
            f"get it from {spec.source} and extract it there, or rerun with --download to let torchvision fetch it "
            "(nothing is downloaded without that flag)") from err
    labels = getattr(ds, spec.labels_attr)
    names = [clean_class_name(c) for c in ds.classes]
    return TorchvisionImages(ds, input_size, labels, names)
