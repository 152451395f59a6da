"""Parameter selection and weight averaging shared by the methods."""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Tuple

import torch
from torch import nn

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def norm_layers(model: nn.Module, exclude: Iterable[str] = ()) -> List[Tuple[str, nn.Module]]:
    """Normalisation layers by qualified name; `exclude` holds fnmatch patterns on that name."""
    exclude = list(exclude)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, NORM_LAYERS) and not any(fnmatch.fnmatch(name, p) for p in exclude)]


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


def enable_norm_affine(model: nn.Module, exclude: Iterable[str] = ()) -> List[str]:
    """Turn on gradients for the affine parameters of normalisation layers; returns their qualified names."""
    names = []
    for layer_name, layer in norm_layers(model, exclude):
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
