"""Parameter selection and weight averaging shared by the methods."""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterable, Iterator, List, Tuple

import torch
import torch.nn.functional as F
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
