"""IT3's conditioned network f(x, y) (Durasov et al., "IT3: Idempotent Test-Time Training", ICML 2025,
arXiv:2410.04201) and its training loss.

`IT3Net` turns any network into f(x, y): y (a class distribution, a one-hot label, a regression value or a
dense map) is embedded and added to the output of a chosen layer, or concatenated to the input. y = 0 is the
neutral "don't know" signal. The addition is a forward hook that exists only while `IT3Net.forward` runs, so
the wrapped network carries no hook between calls and can still be used on its own.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("classification", "regression")


def _feature_channels(module: nn.Module) -> Optional[int]:
    """Channel count of a layer's output when the layer type says it (conv, linear, norm layers)."""
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape is not None and len(shape) == 1:
        return int(shape[0])
    return None


class IT3Net(nn.Module):
    """f(x, y): `net` with the signal y injected at `layer` (by module name) or concatenated to the input.

    Args:
        net: the network; `net(x)` returns logits (B, K), dense logits (B, K, H, W) or a regression output.
        num_outputs: K, the size of dim 1 of the output, which is also the size of the signal y.
        layer: qualified module name in `net` (see `net.named_modules()`); the embedding of y is added to that
            layer's output, which must be channels-first: (B, C) or (B, C, ...). None concatenates y to the
            input along dim 1 instead (then `net` must accept C_in + K input channels).
        task: "classification" (the signal is softmax(logits), ground truth is a class index) or "regression"
            (the signal is the output itself).
        dense: y is a map (B, K, H, W) (segmentation, depth) rather than a vector (B, K).
        feature_channels: channels of `layer`'s output when they cannot be read from the layer type.
    """

    def __init__(self, net: nn.Module, num_outputs: int, layer: Optional[str] = None,
                 task: str = "classification", dense: bool = False, feature_channels: Optional[int] = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"num_outputs must be a positive integer (the size of the output's dim 1), "
                             f"got {num_outputs!r}")
        self.net = net
        self.num_outputs = num_outputs
        self.layer = layer
        self.task = task
        self.dense = dense
        self.embed: Optional[nn.Module] = None
        if layer is not None:
            modules = dict(net.named_modules())
            if layer not in modules or layer == "":
                names = [n for n in modules if n][:20]
                raise ValueError(f"layer {layer!r} is not a module of the network; pick one of its "
                                 f"named_modules(), e.g. {names}, or layer=None to concatenate y to the input")
            channels = feature_channels or _feature_channels(modules[layer])
            if channels is None:
                raise ValueError(f"cannot tell how many channels layer {layer!r} "
                                 f"({type(modules[layer]).__name__}) outputs; pass feature_channels=")
            self.feature_channels = channels
            # Two layers with a non-linearity, as in the authors' code: a single linear map of a one-hot vector
            # would make the injected signal an additive per-class bias and nothing more.
            if dense:
                self.embed = nn.Sequential(nn.Conv2d(num_outputs, channels, 1), nn.LeakyReLU(0.2),
                                           nn.Conv2d(channels, channels, 1))
            else:
                self.embed = nn.Sequential(nn.Linear(num_outputs, channels), nn.LeakyReLU(0.2),
                                           nn.Linear(channels, channels))

    # ---- what the wrapped model knows --------------------------------------------------------------------------
    # When `net` is an ImageModel (tta.create_model, tta.wrap_model), its input size and class names are the
    # IT3 network's too: `tta run` and the benchmark runner read them to size and label the data.
    @property
    def input_size(self):
        return getattr(self.net, "input_size", None)

    @input_size.setter
    def input_size(self, value) -> None:
        if not hasattr(self.net, "input_size"):
            raise AttributeError(f"IT3Net's network ({type(self.net).__name__}) has no input_size; wrap it with "
                                 "tta.wrap_model(net, input_size=...) before IT3Net")
        self.net.input_size = value

    @property
    def class_names(self):
        return getattr(self.net, "class_names", None)

    # ---- the signal y ----------------------------------------------------------------------------------------
    def signal(self, outputs: torch.Tensor) -> torch.Tensor:
        """The network's output as the y it is fed back: class probabilities, or the regression output itself."""
        return outputs.softmax(1) if self.task == "classification" else outputs

    def neutral(self, x: torch.Tensor) -> torch.Tensor:
        """The "don't know" signal 0 for the batch x."""
        spatial = tuple(x.shape[2:]) if self.dense else ()
        return x.new_zeros((x.shape[0], self.num_outputs) + spatial)

    def target_signal(self, target: torch.Tensor) -> torch.Tensor:
        """Ground truth as a signal: class indices become one-hot vectors (maps); float targets pass through."""
        if self.task == "classification" and not target.is_floating_point():
            onehot = F.one_hot(target.long(), self.num_outputs).float()
            return onehot.movedim(-1, 1) if onehot.dim() > 2 else onehot
        return target.float()

    # ---- forward ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _injected(self, emb: torch.Tensor) -> Iterator[None]:
        target = dict(self.net.named_modules())[self.layer]

        def add_embedding(_module, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[1] != self.feature_channels:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"IT3Net adds y's embedding to the output of layer {self.layer!r}, which must be "
                                 f"channels-first with {self.feature_channels} channels; got {shape}. Pick another "
                                 "layer or pass feature_channels=")
            e = emb
            if e.dim() == 4 and output.dim() == 4 and e.shape[2:] != output.shape[2:]:
                e = F.interpolate(e, size=output.shape[2:], mode="bilinear", align_corners=False)
            while e.dim() < output.dim():
                e = e.unsqueeze(-1)
            return output + e

        handle = target.register_forward_hook(add_embedding)
        try:
            yield
        finally:
            handle.remove()  # never leave a hook behind, even when the forward pass raises

    def _concat_input(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return torch.cat([x, y.reshape(y.shape[0], -1)], 1)
        if y.dim() == 2:
            y = y.reshape(y.shape + (1,) * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
        elif y.shape[2:] != x.shape[2:]:
            y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([x, y.to(x.dtype)], 1)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f(x, y); y=None means the neutral signal 0."""
        if y is None:
            y = self.neutral(x)
        expected = 4 if self.dense else 2
        if y.dim() != expected or y.shape[0] != x.shape[0] or y.shape[1] != self.num_outputs:
            kind = "(B, K, H, W)" if self.dense else "(B, K)"
            raise ValueError(f"y must have shape {kind} with B={x.shape[0]} and K={self.num_outputs}, got "
                             f"{tuple(y.shape)}; feed class probabilities/one-hot labels (use target_signal) "
                             "or None for the neutral signal")
        if self.embed is None:
            return self.net(self._concat_input(x, y))
        with self._injected(self.embed(y)):
            return self.net(x)

    def extra_repr(self) -> str:
        where = f"layer={self.layer!r}" if self.layer is not None else "input concatenation"
        return f"{where}, num_outputs={self.num_outputs}, task={self.task}, dense={self.dense}"


def it3_training_loss(model: IT3Net, x: torch.Tensor, target: torch.Tensor, p_ground_truth: float = 0.2,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """IT3's training objective on one batch, as in the authors' code.

    y0 is the ground truth with probability `p_ground_truth` (per example) and the neutral 0 otherwise;
    y1 = f(x, y0) and y2 = f(x, signal(y1)); the loss is task_loss(y1) + task_loss(y2) with cross-entropy for
    classification (target: class indices, or probabilities) and MSE for regression. Training on both
    applications teaches f to map any of {0, the truth, its own prediction} to the truth, which is what makes
    idempotence a useful test-time signal.
    """
    if not isinstance(model, IT3Net):
        raise TypeError("it3_training_loss needs an IT3Net; wrap your network with "
                        "tta.nets.IT3Net(net, num_outputs=K, layer='<module name>')")
    if not 0.0 <= p_ground_truth <= 1.0:
        raise ValueError(f"p_ground_truth must lie in [0, 1], got {p_ground_truth}")
    truth = model.target_signal(target).to(x.device)
    keep = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < p_ground_truth
    keep = keep.reshape((-1,) + (1,) * (truth.dim() - 1))
    y0 = torch.where(keep, truth, torch.zeros_like(truth))
    out1 = model(x, y0)
    out2 = model(x, model.signal(out1))

    def task_loss(out: torch.Tensor) -> torch.Tensor:
        if model.task == "classification":
            return F.cross_entropy(out, target if not target.is_floating_point() else truth)
        return F.mse_loss(out, truth)

    return task_loss(out1) + task_loss(out2)
