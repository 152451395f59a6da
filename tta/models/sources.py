"""Model sources: `timm:<name>`, `tv:<name>`, `clip:<arch>@<pretrained>`, `smp:<arch>/<encoder>`.

Each source builds the network (hub weights when `pretrained`, a local file when `weights` is given) and
returns an `ImageModel` that knows its normalisation, class names and input size. Heavy libraries are imported
inside the builders, so `import tta` needs only torch. Hub weights not on this machine are downloaded only after a
short check that the hub answers (tta.models.hub), so an offline machine gets one line saying so at once.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..registry import Registry
from .hub import download_errors, hf_endpoint, require_hf_repo, require_host, require_url
from .weights import find_offline_weights, load_weights
from .wrapper import IMAGENET_MEAN, IMAGENET_STD, ImageModel

MODEL_SOURCES = Registry("model source")

# A short subset of CLIP's ImageNet prompt ensemble; pass `templates=` for others.
CLIP_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
                  "a cropped photo of a {}.", "a blurry photo of a {}.", "a good photo of a {}.", "art of the {}.")


def imagenet_class_names() -> List[str]:
    """The 1,000 ImageNet-1k class names (first synonym of each synset), shipped with timm."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


def default_class_names(num_classes: Optional[int]) -> Optional[List[str]]:
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)] if num_classes else None


@MODEL_SOURCES.register("timm")
def timm_model(name: str, pretrained: bool = True, weights=None, num_classes: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None, **kwargs) -> ImageModel:
    import timm
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    download = pretrained and weights is None
    if download:
        require_timm_weights(name)
    with download_errors(f"the timm weights of {name}"):
        net = timm.create_model(name, pretrained=download, **extra, **kwargs)
    if weights is not None:
        load_weights(net, weights)
    cfg = net.pretrained_cfg
    return ImageModel(net, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                      class_names or default_class_names(net.num_classes), tuple(cfg.get("input_size", (3, 224, 224))),
                      name=f"timm:{name}")


def require_timm_weights(name: str) -> None:
    """Before timm downloads the pretrained weights of `name`: fail at once if they are not cached and the host that
    serves them does not answer. timm reads them from the Hugging Face hub when the model has a hub id, else from
    its URL; a name timm does not know is left to timm's own error."""
    from timm.models import get_pretrained_cfg
    what = f"the timm weights of {name}"
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            return require_hf_repo(name[len(prefix):].partition("@")[0], what)
    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.file or cfg.state_dict:
        return
    if cfg.hf_hub_id:
        require_hf_repo(cfg.hf_hub_id, what)
    elif cfg.url:
        require_url(cfg.url, what)


@MODEL_SOURCES.register("tv")
def torchvision_model(name: str, pretrained: bool = True, weights=None, num_classes: Optional[int] = None,
                      class_names: Optional[Sequence[str]] = None, **kwargs) -> ImageModel:
    """`tv:mobilenet_v2` (torchvision's DEFAULT weights) or `tv:mobilenet_v2@IMAGENET1K_V1` (a named weight set)."""
    import torchvision
    name, _, tag = name.partition("@")
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    net = torchvision.models.get_model(name, weights=None, **extra, **kwargs)
    categories = None
    if weights is not None:
        load_weights(net, weights)
    elif pretrained:
        choices = torchvision.models.get_model_weights(name)
        if tag and tag not in choices.__members__:
            raise KeyError(f"unknown torchvision weights {tag!r} for {name}; valid: {', '.join(choices.__members__)}")
        enum = choices[tag] if tag else choices.DEFAULT
        categories = enum.meta.get("categories")
        local = find_offline_weights(enum.url.rsplit("/", 1)[-1])
        # An offline copy under the same file name is the same checkpoint; otherwise torchvision downloads it.
        if local:
            state = torch.load(local, map_location="cpu", weights_only=True)
        else:
            what = f"the torchvision weights {name}@{enum.name}"
            require_url(enum.url, what)
            with download_errors(what):
                state = enum.get_state_dict(progress=True)
        net.load_state_dict(state)
    out = _output_width(net)
    names = class_names or categories or default_class_names(out)
    return ImageModel(net, IMAGENET_MEAN, IMAGENET_STD, names, (3, 224, 224),
                      name=f"tv:{name}" + (f"@{tag}" if tag else ""))


def _output_width(net: nn.Module) -> Optional[int]:
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


class CLIPZeroShot(nn.Module):
    """open_clip's image tower followed by a fixed zero-shot head: scaled cosine similarity to class text embeddings."""

    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.visual = visual
        self.register_buffer("text_embeddings", text_embeddings)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.visual(x)
        features = features / features.norm(dim=-1, keepdim=True)
        return self.logit_scale * features @ self.text_embeddings.t()


@torch.no_grad()
def clip_text_head(model, tokenizer, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(K, D) unit vectors: per class, the normalised mean of the normalised embeddings of its prompts."""
    rows = []
    for name in class_names:
        emb = model.encode_text(tokenizer([t.format(name) for t in templates]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


@MODEL_SOURCES.register("clip")
def clip_model(name: str, pretrained: bool = True, weights=None, class_names: Optional[Sequence[str]] = None,
               templates: Sequence[str] = CLIP_TEMPLATES, num_classes: Optional[int] = None, **kwargs) -> ImageModel:
    """`clip:ViT-B-32@openai`: the image tower is what adapts; the text tower is used once to build the head."""
    import open_clip
    arch, _, tag = name.partition("@")
    source = str(weights) if weights is not None else (tag or None) if pretrained else None
    if source is not None and weights is None and not os.path.exists(os.path.expanduser(source)):
        require_clip_weights(arch, source)
    with download_errors(f"the open_clip weights {name}"):
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source, **kwargs)
    class_names = list(class_names) if class_names is not None else imagenet_class_names()
    if num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names were given")
    model.eval()
    head = clip_text_head(model, open_clip.get_tokenizer(arch), class_names, templates)
    logit_scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return ImageModel(CLIPZeroShot(visual, head, logit_scale), mean, std, class_names, (3, *size),
                      name=f"clip:{name}")


def require_clip_weights(arch: str, tag: str) -> None:
    """Before open_clip downloads `arch`@`tag`: from the Hugging Face hub when the tag has a hub id (open_clip's
    preference), else from its URL."""
    import open_clip
    what = f"the open_clip weights {arch}@{tag}"
    if arch.startswith("hf-hub:"):
        return require_hf_repo(arch[len("hf-hub:"):], what)
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    if cfg.get("hf_hub"):
        require_hf_repo(os.path.split(cfg["hf_hub"])[0], what)
    elif cfg.get("url"):
        require_url(cfg["url"], what)


@MODEL_SOURCES.register("smp")
def smp_model(name: str, pretrained: bool = True, weights=None, num_classes: Optional[int] = None,
              class_names: Optional[Sequence[str]] = None, task: str = "segmentation",
              input_size=(3, 512, 512), **kwargs) -> ImageModel:
    """`smp:Unet/resnet34`: segmentation (K output channels) or, with task="depth", a one-channel depth map."""
    import segmentation_models_pytorch as smp
    arch, sep, encoder = name.partition("/")
    if not sep:
        raise ValueError(f"smp models are named smp:<arch>/<encoder>, e.g. smp:Unet/resnet34; got smp:{name}")
    if task == "depth":
        num_classes = 1
    elif num_classes is None:
        if class_names is None:
            raise ValueError("smp segmenters need num_classes or class_names")
        num_classes = len(class_names)
    download = pretrained and weights is None
    if download:
        require_smp_weights(encoder)
    with download_errors(f"the segmentation_models_pytorch encoder weights of {encoder}"):
        net = smp.create_model(arch, encoder_name=encoder, classes=num_classes,
                               encoder_weights="imagenet" if download else None, **kwargs)
    if weights is not None:
        load_weights(net, weights)
    names = None if task == "depth" else (list(class_names) if class_names else default_class_names(num_classes))
    return ImageModel(net, IMAGENET_MEAN, IMAGENET_STD, names, tuple(input_size), task=task, name=f"smp:{name}")


def require_smp_weights(encoder: str) -> None:
    """Before segmentation_models_pytorch downloads an encoder's ImageNet weights: timm's (`tu-` encoders) or the
    Hugging Face repository its settings name."""
    import segmentation_models_pytorch as smp
    if encoder.startswith("tu-"):
        return require_timm_weights(encoder[len("tu-"):])
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet", {})
    what = f"the segmentation_models_pytorch encoder weights of {encoder}"
    if settings.get("repo_id"):
        require_hf_repo(settings["repo_id"], what)
    elif settings.get("url"):
        require_url(settings["url"], what)
    elif settings:
        require_host(hf_endpoint(), what)


def create_model(spec: str, pretrained: bool = True, weights=None, **kwargs) -> ImageModel:
    """Build a wrapped model from `<source>:<name>`; `weights` is a local checkpoint file used instead of the hub.
    The model comes in eval mode, as a pretrained model is used: calling it never updates batch-norm statistics."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"model names look like <source>:<name> with source in {MODEL_SOURCES.names()}, "
                         f"e.g. timm:resnet50, tv:mobilenet_v2, clip:ViT-B-32@openai, smp:Unet/resnet34; got {spec!r}")
    source, _, name = spec.partition(":")
    return MODEL_SOURCES.get(source)(name, pretrained=pretrained, weights=weights, **kwargs).eval()


# source -> function listing that source's model names matching an fnmatch pattern; sources that know their
# members register one (the zoo does, from tta/zoo/registry.py, so this module need not import the zoo)
MODEL_LISTERS: Dict[str, Callable[[str], List[str]]] = {}


def _timm_names(pattern: str) -> List[str]:
    import timm
    return timm.list_models(pattern)


def _torchvision_names(pattern: str) -> List[str]:
    import fnmatch
    import torchvision
    return [n for n in torchvision.models.list_models() if fnmatch.fnmatch(n, pattern)]


def _open_clip_names(pattern: str) -> List[str]:
    import fnmatch
    import open_clip
    names = (f"{arch}@{tag}" for arch, tag in open_clip.list_pretrained())
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


MODEL_LISTERS.update(timm=_timm_names, tv=_torchvision_names, clip=_open_clip_names)


def list_models(pattern: str = "*") -> List[str]:
    """Model sources, or with `<source>:<pattern>` the models of a source that can list them (timm, tv, zoo)."""
    source, sep, rest = pattern.partition(":")
    if sep and source in MODEL_LISTERS:
        return [f"{source}:{n}" for n in MODEL_LISTERS[source](rest or "*")]
    if sep:
        raise ValueError(f"the {source!r} source cannot list its models; sources that can: "
                         f"{', '.join(sorted(MODEL_LISTERS))}")
    return [f"{s}:" for s in MODEL_SOURCES.names(pattern)]
