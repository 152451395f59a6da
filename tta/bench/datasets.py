"""Data kinds: how the `data:` section of a benchmark file becomes a list of domains.

Each kind registers a config dataclass (its YAML keys; unknown keys are errors) and a builder. Kinds that are
not -C sets natively (folders, zero-shot sets, ADE20K, NYUv2, ...) get their corruptions on the fly, optionally
cached on disk (tta.data.corruption_cache). A later suite adds its own kind with `register_data_kind`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset, Subset

from ..registry import Registry
from ..data.corruptions import check_corruption, corruption_names
from ..data.streams import Domain
from ..data.subsample import labels_of, per_class_indices
from .fields import expand_path, strict_dataclass

DATA_KINDS = Registry("data kind")


@dataclass
class DataConfig:
    """Keys every kind accepts."""
    kind: str = ""
    root: Optional[str] = None             # where the user's copy lives (~ and $VARS expand; --data-root overrides)
    corruptions: Union[str, List[str], None] = None   # "standard" | "extra" | "all" | a list; None: clean only
    severities: List[int] = field(default_factory=lambda: [5])
    clean: bool = False                    # also evaluate the uncorrupted images (for on-the-fly kinds)
    cache: Optional[str] = None            # folder for on-the-fly corruptions (ImageNet-C layout)
    corruption_seed: int = 0
    part: Optional[str] = None             # "evaluation" | "held_out": one of two disjoint seeded halves of each
                                           # class, so settings are chosen on images that are never reported
    per_class: Optional[int] = None        # seeded per-class subsample (the papers use 3-5 images per class)
    # leave out the images that `per_class: N` draws (same part and subsample_seed) before drawing per_class: a
    # replication on images that an earlier run at per_class N never saw
    exclude_per_class: Optional[int] = None
    max_images: Optional[int] = None       # seeded random subset of at most this many images per domain
    subsample_seed: int = 0

    def corruption_list(self) -> List[str]:
        if self.corruptions is None:
            return []
        names = corruption_names(self.corruptions) if isinstance(self.corruptions, str) else list(self.corruptions)
        for name in names:
            for s in self.severities:
                check_corruption(name, s)
        return names

    def resolved_root(self, kind: str) -> Path:
        if not self.root:
            raise ValueError(f"data kind {kind!r} needs data.root (the folder of your copy); set it in the benchmark "
                             "file or pass --data-root")
        return expand_path(self.root, "data.root", "or pass --data-root")

    def resolved_cache(self) -> Optional[Path]:
        return expand_path(self.cache, "data.cache", "or remove data.cache to corrupt on the fly without a cache") \
            if self.cache else None



@dataclass
class BuildContext:
    input_size: Tuple[int, int, int]
    class_names: Optional[List[str]] = None   # the model's
    download: bool = False
    limit: Optional[int] = None              # --limit: at most this many images per domain
    on_error: str = "raise"                  # --on-error: "skip" drops unreadable image files (kinds that read them)


@dataclass
class DataKind:
    config: type
    build: Callable[[DataConfig, BuildContext], List[Domain]]


def register_data_kind(name: str, config: type = DataConfig):
    """Decorator for `build(cfg, ctx) -> List[Domain]`; `config` is a DataConfig subclass with the kind's keys."""
    def decorator(fn):
        DATA_KINDS.register(name)(DataKind(config, fn))
        return fn
    return decorator


def parse_data_config(values: Dict) -> DataConfig:
    values = dict(values)
    if "kind" not in values:
        raise ValueError(f"data needs a `kind`; one of {', '.join(DATA_KINDS.names())}")
    kind = DATA_KINDS.get(values["kind"])
    return strict_dataclass(kind.config, values, f"data (kind {values['kind']})")


# Kinds that read image files one by one (tta.data.images.ImageList), so that one unreadable file can be skipped.
SKIPPABLE_KINDS = ("imagenet-c", "imagenet-variant", "folder", "foolbox")


def build_domains(cfg: DataConfig, ctx: BuildContext) -> List[Domain]:
    if ctx.on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {ctx.on_error!r}")
    if ctx.on_error == "skip" and cfg.kind not in SKIPPABLE_KINDS:
        raise ValueError(f"--on-error skip applies to the data kinds that read image files one by one "
                         f"({', '.join(SKIPPABLE_KINDS)}), not to {cfg.kind!r}; leave it out")
    domains = DATA_KINDS.get(cfg.kind).build(cfg, ctx)
    return [_subsample(d, cfg, ctx.limit) for d in domains]


PARTS = ("evaluation", "held_out")


def _subsample(domain: Domain, cfg: DataConfig, limit: Optional[int]) -> Domain:
    n = len(domain.dataset)
    idx = list(range(n))
    if cfg.part is not None or cfg.per_class is not None or cfg.exclude_per_class is not None:
        labels = labels_of(domain.dataset)
        if labels is None:
            raise ValueError(f"data kind {cfg.kind!r} has no per-image class labels, so part/per_class/"
                             "exclude_per_class cannot apply; "
                             "use max_images instead")
        if cfg.part is not None:
            idx = half_of_each_class(labels, cfg.part, cfg.subsample_seed)
        if cfg.exclude_per_class is not None:
            if isinstance(cfg.exclude_per_class, bool) or not isinstance(cfg.exclude_per_class, int) \
                    or cfg.exclude_per_class < 1:
                raise ValueError(f"data.exclude_per_class must be a positive integer (the per_class of the draw to "
                                 f"leave out) or null, got {cfg.exclude_per_class!r}")
            seen = set(per_class_indices([labels[i] for i in idx], cfg.exclude_per_class, cfg.subsample_seed))
            idx = [i for j, i in enumerate(idx) if j not in seen]
        if cfg.per_class is not None:
            chosen = per_class_indices([labels[i] for i in idx], cfg.per_class, cfg.subsample_seed)
            idx = [idx[j] for j in chosen]
    caps = [c for c in (cfg.max_images, limit) if c is not None]
    if caps and min(caps) < len(idx):
        rng = np.random.default_rng(cfg.subsample_seed)
        idx = sorted(idx[j] for j in rng.choice(len(idx), min(caps), replace=False))
    if len(idx) == n:
        return domain
    return dataclasses.replace(domain, dataset=Subset(domain.dataset, idx))


def half_of_each_class(labels, part: str, seed: int = 0) -> List[int]:
    """The images of one of two disjoint halves of every class (a seeded draw; the evaluation half takes the
    larger half of an odd class), in their original order."""
    if part not in PARTS:
        raise ValueError(f"data.part must be one of {', '.join(PARTS)}, got {part!r}")
    rng = np.random.default_rng([seed, 2])  # its own stream: the halves do not depend on per_class draws
    by_class: Dict[int, List[int]] = {}
    for i, v in enumerate(labels):  # one pass: ImageNet's 1,000 classes need no scan per class
        if int(v) >= 0:
            by_class.setdefault(int(v), []).append(i)
    keep: List[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        shuffled = [members[j] for j in rng.permutation(len(members))]
        half = -(-len(members) // 2)
        keep += shuffled[:half] if part == "evaluation" else shuffled[half:]
    return sorted(keep)


def image_list(items, ctx: BuildContext):
    """An ImageList sized for the model that skips unreadable files under --on-error skip."""
    from ..data.images import ImageList
    return ImageList(items, ctx.input_size, on_error=ctx.on_error)


def skipped_info(ds) -> Dict[str, object]:
    """What a row records of the files --on-error skip dropped (nothing when none was): how many, which (as
    printable names), and a `data_id_suffix` that the runner adds to the row's data_id. Dropping a file shifts the
    index of every later image, so rows (and cached corruptions) made without it must never be taken for rows of
    the whole folder, e.g. once the file is fixed."""
    from ..data.images import printable
    skipped = getattr(ds, "skipped", None)
    if not skipped:
        return {}
    print(f"data: {ds.skipped_summary()} (--on-error skip); each row records them in domain_info", file=sys.stderr)
    names = [printable(p) for p in skipped]
    digest = hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:8]
    return {"skipped_files": len(names), "skipped": names, "data_id_suffix": f"-{len(names)}unreadable:{digest}"}


def with_corruptions(base: Dataset, cfg: DataConfig, source: str, input_size, name: str = "clean",
                     **domain_kw) -> List[Domain]:
    """Domains for an uncorrupted set: clean (when asked or when no corruption is listed) plus corruptions."""
    from ..data.corruption_cache import CorruptedDataset
    info = skipped_info(base)
    if info:
        domain_kw["info"] = {**domain_kw.get("info", {}), **info}
        source += info["data_id_suffix"]  # its own cache: item i is another image than in the whole folder
    corruptions = cfg.corruption_list()
    domains = [Domain(name, base, **domain_kw)] if cfg.clean or not corruptions else []
    for c in corruptions:
        for s in cfg.severities:
            ds = CorruptedDataset(base, c, s, cfg.corruption_seed, cfg.resolved_cache(), source=source,
                                  input_size=input_size)
            domains.append(Domain(c, ds, severity=s, **domain_kw))
    return domains


# ---- the kinds ---------------------------------------------------------------------------------------------
@register_data_kind("imagenet-c")
def _imagenet_c(cfg: DataConfig, ctx: BuildContext) -> List[Domain]:
    from ..data.imagenet_c import imagenet_c_items
    root = cfg.resolved_root("imagenet-c")
    names = cfg.corruption_list() or corruption_names("standard")
    domains = []
    for c in names:
        for s in cfg.severities:
            ds = image_list(imagenet_c_items(root, c, s), ctx)
            domains.append(Domain(c, ds, severity=s, info=skipped_info(ds)))
    return domains


@dataclass
class CIFARCConfig(DataConfig):
    classes: str = "cifar10"     # cifar10 | cifar100


@register_data_kind("cifar-c", CIFARCConfig)
def _cifar_c(cfg: CIFARCConfig, ctx: BuildContext) -> List[Domain]:
    from ..data.cifar_c import CIFARC
    root = cfg.resolved_root("cifar-c")
    names = cfg.corruption_list() or corruption_names("standard")
    return [Domain(c, CIFARC(root, c, s, ctx.input_size, cfg.classes), severity=s)
            for c in names for s in cfg.severities]


@dataclass
class VariantConfig(DataConfig):
    variant: str = "a"           # a | r | v2


@register_data_kind("imagenet-variant", VariantConfig)
def _imagenet_variant(cfg: VariantConfig, ctx: BuildContext) -> List[Domain]:
    from ..data.imagenet_c import imagenet_variant_items
    items, subset = imagenet_variant_items(cfg.resolved_root("imagenet-variant"), cfg.variant)
    return with_corruptions(image_list(items, ctx), cfg, f"imagenet-{cfg.variant}", ctx.input_size,
                            name=f"imagenet-{cfg.variant}", class_subset=subset)


@register_data_kind("folder")
def _folder(cfg: DataConfig, ctx: BuildContext) -> List[Domain]:
    from ..data.images import open_images
    root = cfg.resolved_root("folder")
    ds = open_images(str(root), ctx.input_size, ctx.class_names, ctx.on_error)
    return with_corruptions(ds, cfg, f"folder:{root.resolve()}", ctx.input_size, name=root.name or "folder")


@dataclass
class FoolboxConfig(DataConfig):
    set: str = "imagenet"


@register_data_kind("foolbox", FoolboxConfig)
def _foolbox(cfg: FoolboxConfig, ctx: BuildContext) -> List[Domain]:
    from ..data.images import open_images
    ds = open_images(f"foolbox:{cfg.set}", ctx.input_size, ctx.class_names, ctx.on_error)
    return with_corruptions(ds, cfg, f"foolbox:{cfg.set}", ctx.input_size, name=f"foolbox-{cfg.set}")


@dataclass
class ZeroShotConfig(DataConfig):
    sets: List[str] = field(default_factory=lambda: ["cifar10"])
    templates: Union[str, List[str]] = "clip"     # clip | single | a list of "...{}..." strings


@register_data_kind("zeroshot", ZeroShotConfig)
def _zeroshot(cfg: ZeroShotConfig, ctx: BuildContext) -> List[Domain]:
    from ..data.zeroshot import open_zeroshot, templates_for
    root = cfg.resolved_root("zeroshot")
    domains: List[Domain] = []
    for name in cfg.sets:
        ds = open_zeroshot(name, root, ctx.input_size, download=ctx.download)
        domains += with_corruptions(ds, cfg, f"zeroshot:{name}", ctx.input_size, name=name,
                                    class_names=ds.class_names, templates=templates_for(name, cfg.templates))
    return domains


@dataclass
class ADE20KConfig(DataConfig):
    split: str = "validation"


@register_data_kind("ade20k", ADE20KConfig)
def _ade20k(cfg: ADE20KConfig, ctx: BuildContext) -> List[Domain]:
    from ..data.dense import ADE20K
    ds = ADE20K(cfg.resolved_root("ade20k"), cfg.split, ctx.input_size)
    return with_corruptions(ds, cfg, f"ade20k:{cfg.split}", ctx.input_size, name="ade20k")


@dataclass
class NYUv2Config(DataConfig):
    depth_scale: float = 1000.0   # PNG depth units per metre


@register_data_kind("nyuv2", NYUv2Config)
def _nyuv2(cfg: NYUv2Config, ctx: BuildContext) -> List[Domain]:
    from ..data.dense import NYUv2Depth
    ds = NYUv2Depth(cfg.resolved_root("nyuv2"), ctx.input_size, cfg.depth_scale)
    return with_corruptions(ds, cfg, "nyuv2", ctx.input_size, name="nyuv2")


@dataclass
class FashionMNISTConfig(DataConfig):
    split: str = "test"          # with root (or "debian"): the full split; without: the subset shipped in the package


@register_data_kind("fashion-mnist", FashionMNISTConfig)
def _fashion_mnist(cfg: FashionMNISTConfig, ctx: BuildContext) -> List[Domain]:
    if cfg.root:
        from ..data.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist
        root = DEBIAN_ROOT if cfg.root == "debian" else cfg.resolved_root("fashion-mnist")
        images, labels = load_fashion_mnist(cfg.split, root=root, download=ctx.download)
        source = f"fashion-mnist:{cfg.split}"
    else:
        from ..data.fashion_mnist_subset import load_subset
        images, labels = load_subset()
        source = "fashion-mnist:shipped-test-subset"
    if tuple(images.shape[1:]) != tuple(ctx.input_size):
        raise ValueError(f"Fashion-MNIST images are {tuple(images.shape[1:])} but the model takes "
                         f"{tuple(ctx.input_size)}; use a model built for 1x28x28 inputs such as zoo:fmnist-cnn")
    return with_corruptions(LabelledTensors(images, labels), cfg, source, ctx.input_size, name="fashion-mnist")


class LabelledTensors(Dataset):
    """Images and labels held in memory; `targets` lets per-class subsampling read labels without images."""

    def __init__(self, images, labels):
        self.images, self.targets = images, labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


@dataclass
class ScenesConfig(DataConfig):
    scenes: int = 200            # test scenes composed from the shipped Fashion-MNIST test subset (tta.data.scenes)
    scene_seed: int = 0


@register_data_kind("fashion-mnist-scenes", ScenesConfig)
def _fashion_mnist_scenes(cfg: ScenesConfig, ctx: BuildContext) -> List[Domain]:
    """Two-item Fashion-MNIST scenes with per-pixel masks (0 background, c + 1 item class): segmentation targets,
    and ARI / FG-ARI targets for slot models (the items of a scene have distinct classes)."""
    from ..data.scenes import scene_dataset
    ds = scene_dataset(cfg.scenes, cfg.scene_seed)
    size = tuple(ds[0][0].shape)
    if size != tuple(ctx.input_size):
        raise ValueError(f"scene images are {size} but the model takes {tuple(ctx.input_size)}; use a model built "
                         "for them such as zoo:scenes-seg")
    return with_corruptions(ds, cfg, f"fashion-mnist-scenes:{cfg.scenes}:{cfg.scene_seed}", ctx.input_size,
                            name="scenes")
