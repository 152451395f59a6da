"""Parameter selection and weight averaging shared by the methods."""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterable, Iterator, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import named_by
from .registry import unknown_name_message

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
# What a method's `norms` field names: "all" normalisation layers, or "batch" norm only (the authors' collect_params
# of TENT and EATA, which take BatchNorm2d alone, so that a LayerNorm or GroupNorm network has nothing to adapt there).
NormKind = Literal["all", "batch"]
NORM_KINDS = named_by(NormKind, {"all": NORM_LAYERS, "batch": (nn.modules.batchnorm._BatchNorm,)})


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def norm_layers(model: nn.Module, exclude: Iterable[str] = (), kinds: str = "all") -> List[Tuple[str, nn.Module]]:
    """Normalisation layers by qualified name; `exclude` holds fnmatch patterns on that name, `kinds` a key of
    NORM_KINDS."""
    exclude = list(exclude)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, NORM_KINDS[kinds]) and not any(fnmatch.fnmatch(name, p) for p in exclude)]


def network_of(model: nn.Module) -> nn.Module:
    """The network inside a tta wrapper (ImageModel.net), or the model itself: what names such as `layer4` or
    `head` refer to."""
    from .models.wrapper import ImageModel
    return model.net if isinstance(model, ImageModel) else model


def use_batch_statistics(model: nn.Module) -> None:
    """Make batch-norm layers normalise with the statistics of the test batch.

    Train mode does that; momentum 0 keeps the stored running statistics untouched, so the source model's
    statistics survive online adaptation and `reset()` has nothing of them to repair.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0


@contextlib.contextmanager
def batch_norm_prior(model: nn.Module, strength: float) -> Iterator[None]:
    """Inside the block, batch-norm layers normalise with (strength x the source statistics + the test batch's) /
    (strength + 1): the prior of Schneider et al. (NeurIPS 2020) that MEMO's code applies with strength 16 (its
    _modified_bn_forward: the batch's unbiased variance, and the mixed statistics are constants for autograd). The
    layers must be in eval mode; strength < 0 leaves them as they are (the authors' --prior_strength -1)."""
    if strength < 0:
        yield
        return
    prior = strength / (strength + 1)

    def mixed(m: nn.Module, inputs, output):
        x = inputs[0]
        with torch.no_grad():
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, unbiased=True)
            mean = prior * m.running_mean + (1 - prior) * mean
            var = prior * m.running_var + (1 - prior) * var
        return F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)

    handles = [m.register_forward_hook(mixed) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def enable_norm_affine(model: nn.Module, exclude: Iterable[str] = (), kinds: str = "all") -> List[str]:
    """Turn on gradients for the affine parameters of normalisation layers (of NORM_KINDS[kinds]); returns their
    qualified names."""
    names = []
    for layer_name, layer in norm_layers(model, exclude, kinds):
        for pname, p in layer.named_parameters(recurse=False):
            p.requires_grad_(True)
            names.append(f"{layer_name}.{pname}" if layer_name else pname)
    return names


def trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def last_layer_parameters(model: nn.Module, name: Optional[str] = None) -> List[Tuple[str, nn.Parameter]]:
    """The final prediction layer: the projection of a CLIP zero-shot image tower, else the last Linear/Conv."""
    modules = dict(model.named_modules())
    if name is None:
        for mname, m in modules.items():
            proj = getattr(getattr(m, "visual", None), "proj", None)
            if hasattr(m, "text_embeddings") and isinstance(proj, nn.Parameter):
                return [(f"{mname}.visual.proj".lstrip("."), proj)]
        layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if not layers:
            raise ValueError("adapt='last' found no Linear or Conv layer; name one with last_layer=<module name>")
        name = layers[-1]
    if name not in modules:
        raise ValueError(unknown_name_message("module", name, [n for n in modules if n]))
    prefix = f"{name}." if name else ""
    return [(prefix + n, p) for n, p in modules[name].named_parameters()]


def all_but_last_parameters(model: nn.Module, name: Optional[str] = None) -> List[Tuple[str, nn.Parameter]]:
    """What the official Diffusion-TTA code adapts (diff_tta/models/build.py, load_optimizer with
    freeze_class_embeds: True): the parameters of every leaf module (a module without children) except the last
    one in registration order, which for the torchvision ResNets, ViTs and ConvNeXts it runs is the classification
    layer. Parameters held by a module that has children are in no leaf and stay fixed there, so here too: a ViT's
    class token and position embedding, ConvNeXt's layer scales, nn.MultiheadAttention's packed q/k/v projection.
    The last leaf is the last one that holds parameters (the same on those models); `name` picks the left-out
    module instead. A CLIP zero-shot model's last layer is its fixed text head (the official final_fc), a buffer
    here, so every leaf of its image tower adapts, as there."""
    modules = dict(model.named_modules())
    if name is not None and name not in modules:
        raise ValueError(unknown_name_message("module", name, [n for n in modules if n]))
    leaves = [(n, m) for n, m in modules.items()
              if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None]
    clip_head = any(hasattr(m, "text_embeddings") and hasattr(m, "visual") for m in modules.values())
    if name is not None:
        left_out = {id(p) for p in modules[name].parameters()}
    elif clip_head:
        left_out = set()
    elif leaves:
        left_out = {id(p) for p in leaves[-1][1].parameters()}
    else:
        raise ValueError("adapt='all_but_last' found no module holding parameters; use adapt='all'")
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {id(p): p for _, m in leaves for p in m.parameters(recurse=False) if id(p) not in left_out}
    return [(names[i], p) for i, p in chosen.items()]


def enable_adapted(model: nn.Module, adapt: str, last_layer: Optional[str] = None) -> None:
    """Turn on gradients for what `adapt` names: "all_but_last" (all_but_last_parameters), "all", "norm" (the
    affine parameters of normalisation layers) or "last" (last_layer_parameters); `last_layer` names the module
    "last" adapts and "all_but_last" leaves out."""
    if adapt == "all":
        model.requires_grad_(True)
    elif adapt == "norm":
        if not enable_norm_affine(model):
            raise ValueError("adapt='norm' found no normalisation layers in this model; use adapt='all' or 'last'")
    else:
        select = {"all_but_last": all_but_last_parameters, "last": last_layer_parameters}[adapt]
        for _, p in select(model, last_layer):
            p.requires_grad_(True)
