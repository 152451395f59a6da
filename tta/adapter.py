"""The Adapter base class: a drop-in for `model(x)` that adapts the model on x and returns the prediction.

A method subclasses `Adapter`, declares its `Config` dataclass with the paper's defaults and writes
`configure_model` (which layers train, which statistics normalise), `collect_params` (what the optimizer
updates) and `forward_and_adapt` (one step). The base class owns the snapshot of the source state, `reset()`,
the optimizer and the episodic/online loop, so every method gets them right the same way.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .registry import Registry, unknown_name_message

ADAPTERS = Registry("adapter")
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class AdapterConfig:
    """Settings every method shares. Subclasses override the defaults with their paper's."""
    steps: int = 1                 # optimizer steps per call
    episodic: bool = False         # restore the source state after every call (per-example / per-batch TTA)
    optimizer: str = "sgd"         # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.9          # SGD only
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)  # Adam / AdamW only
    guard: bool = True             # skip non-finite updates; restore the source state on divergence or collapse

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(unknown_name_message("optimizer", self.optimizer, OPTIMIZERS))
        if not (isinstance(self.lr, (int, float)) and self.lr >= 0):
            raise ValueError(f"lr must be a non-negative number, got {self.lr!r}")
        self.betas = tuple(self.betas)


def make_config(config_cls, cfg=None, overrides: Optional[Dict[str, Any]] = None):
    """Build `config_cls` from an optional instance or dict plus keyword overrides; unknown keys are errors."""
    values: Dict[str, Any] = {}
    if isinstance(cfg, dict):
        values.update(cfg)
    elif cfg is not None:
        values.update(dataclasses.asdict(cfg))
    values.update(overrides or {})
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"unknown config key(s) {unknown} for {config_cls.__qualname__}; "
                        f"valid keys: {', '.join(valid)}")
    check_field_types(config_cls, values, config_cls.__qualname__)
    return config_cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint` (the types config and spec dataclasses use); an annotation this
    does not know is not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))  # a nested spec section, built from its mapping
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def check_field_types(cls, values: Dict[str, Any], where: str) -> None:
    """Refuse values of the wrong type (a string for a number, "false" for a boolean) before they silently mean
    something else; the message names the field, the expected type and how to write it."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None or _matches(value, hint):
            continue
        hint_text = ""
        if isinstance(value, str) and _matches(1.0, hint):
            try:
                float(value)
                hint_text = " (YAML reads 1e-3 as a string: write 1.0e-3)"
            except ValueError:
                pass
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no") and _matches(True, hint):
            hint_text = " (write true or false without quotes)"
        raise ValueError(f"{where}: {key} must be {_describe(hint)}, got {type(value).__name__} {value!r}{hint_text}")


def finite_and_largest(t: torch.Tensor, per_slice: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whether all values of t are finite, and their largest magnitude; with per_slice, for each slice along dim 0.
    From one max and one min, which propagate NaN and show +-inf: several times faster than isfinite(t).all() on
    the weights and gradients of large models, which the guard checks at every step."""
    flat = t.reshape(t.shape[0] if per_slice else 1, -1)
    if flat.shape[1] == 0:
        return torch.ones(flat.shape[0], dtype=torch.bool), torch.zeros(flat.shape[0])
    hi, lo = flat.amax(1), flat.amin(1)
    finite, largest = torch.isfinite(hi) & torch.isfinite(lo), torch.maximum(hi, -lo)
    return (finite, largest) if per_slice else (finite[0], largest[0])


def explosion_limit(source: torch.Tensor) -> float:
    """The largest weight magnitude the guard accepts for a parameter whose source value is `source`: a
    thousandfold its source scale (still finite beyond it, but the predictions such weights give are arbitrary)."""
    return 1e3 * (float(source.detach().abs().max()) + 1.0)


def build_optimizer(params: List[nn.Parameter], cfg: AdapterConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def check_batch(x: Any, name: str = "input") -> None:
    """Refuse inputs that would silently corrupt adaptation: non-tensors, empty batches, NaN or inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch with a leading batch dimension, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (images as floats in [0, 1]), got {x.dtype}; "
                        "convert with x.float() / 255 for uint8 images")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; clean or drop those examples before adapting")


class Adapter(nn.Module):
    """Adapts `model` on each call and returns its prediction. The model is adapted in place."""
    Config = AdapterConfig
    name = "adapter"

    def __init__(self, model: nn.Module, cfg: Any = None, **overrides):
        super().__init__()
        self.cfg = make_config(self.Config, cfg, overrides)
        self.model = model
        self.configure_model()
        self.adapted = self.collect_params()
        params = [p for _, p in self.adapted]
        self.optimizer = self.build_optimizer(params) if params else None
        self._source_state = self._capture_state()
        self.guard_events: Dict[str, int] = {}  # divergence-guard interventions over the adapter's life

    # ---- what subclasses write -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Set train/eval modes and requires_grad; may build extra modules (teachers, anchors)."""
        self.model.eval()
        self.model.requires_grad_(False)

    def collect_params(self) -> List[Tuple[str, nn.Parameter]]:
        """(qualified name, parameter) pairs the optimizer updates; names are relative to the model."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset_extra_state(self) -> None:
        """Restore state that is not a tensor in this module (counters, moving averages held as Python values)."""

    def build_optimizer(self, params: List[nn.Parameter]) -> torch.optim.Optimizer:
        return build_optimizer(params, self.cfg)

    # ---- the loop ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        if not self.cfg.episodic:
            return self.adapt_and_predict(x)
        try:
            return self.adapt_and_predict(x)
        finally:
            self.reset()  # episodic: the next call, and the caller, see the source model again

    def check_input(self, x: Any) -> torch.Tensor:
        """Validate x before any method code sees it (so a refused input never changes the state): the batch checks,
        and for a wrapped model (ImageModel) its image checks too, [0, 1] range and channels included. Returns x
        detached (adaptation never differentiates through the input) in the model's floating dtype."""
        from .models.wrapper import ImageModel, check_images
        check_batch(x)
        if isinstance(self.model, ImageModel):
            check_images(x, self.model.input_size[0])
        x = x.detach()
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        return x.to(dtype) if dtype is not None and x.dtype != dtype else x

    def adapt_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.steps == 0:
            with torch.no_grad():
                return self.model(x)
        with torch.enable_grad():  # adapt even when called under torch.no_grad()
            for _ in range(self.cfg.steps):
                outputs = self.forward_and_adapt(x)
        outputs = outputs.detach()
        if self.cfg.guard and self.diverged(outputs):
            self.reset()  # the adapted state is unusable: predict with the source state instead
            with torch.no_grad():
                outputs = self.model(x)
        return outputs

    # ---- divergence guard --------------------------------------------------------------------------------
    def predict_guarded(self, predict: Callable[[], torch.Tensor]) -> torch.Tensor:
        """predict() from the adapted state, for methods that predict after their last step; with the guard on, a
        diverged state (see diverged) is replaced by the source state and predict() runs again."""
        with torch.no_grad():
            outputs = predict()
        if self.cfg.guard and self.diverged(outputs):
            self.reset()
            with torch.no_grad():
                outputs = predict()
        return outputs

    def optimize(self, loss: torch.Tensor) -> bool:
        """backward, step, zero_grad; with the guard on, a non-finite loss or gradient skips the update."""
        if self.cfg.guard and not torch.isfinite(loss.detach()).all():
            self.optimizer.zero_grad()
            self._count("nonfinite_loss")
            return False
        loss.backward()
        return self.step_guarded()

    def step_guarded(self, loss: Optional[float] = None) -> bool:
        """The optimizer step on gradients already accumulated, then zero_grad; with the guard on, a non-finite
        gradient, or a non-finite `loss` (the value those gradients came from, when given), skips the update. For
        methods that accumulate gradients themselves before stepping."""
        if self.cfg.guard and loss is not None and not math.isfinite(loss):
            self.optimizer.zero_grad()
            self._count("nonfinite_loss")
            return False
        if self.cfg.guard and any(p.grad is not None and not finite_and_largest(p.grad)[0] for _, p in self.adapted):
            self.optimizer.zero_grad()
            self._count("nonfinite_grad")
            return False
        self.optimizer.step()
        self.optimizer.zero_grad()
        return True

    def diverged(self, outputs: torch.Tensor) -> bool:
        """Non-finite weights or outputs, exploded weights, or a collapse: a batch of 16 or more all predicted as
        one class with near-zero entropy, which entropy minimisation reaches when it degenerates."""
        if any(not finite_and_largest(p.detach())[0] for _, p in self.adapted) or not torch.isfinite(outputs).all():
            self._count("diverged")
            return True
        if self._exploded():
            self._count("exploded")
            return True
        if outputs.dim() == 2 and outputs.shape[0] >= 16 and outputs.shape[1] >= 2:
            probs = outputs.float().softmax(1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
            if bool((outputs.argmax(1) == outputs[0].argmax()).all()) and float(entropy) < 1e-3:
                self._count("collapsed")
                return True
        return False

    def _exploded(self) -> bool:
        """Weights that grew a thousandfold beyond the source's scale: still finite, but the predictions they give
        are arbitrary (a huge learning rate reaches this long before NaN)."""
        names = {id(p): n for n, p in self.named_parameters()}
        source = self._source_state["module"]
        for _, p in self.adapted:
            p0 = source.get(names.get(id(p)))
            if p0 is not None and float(finite_and_largest(p.detach())[1]) > explosion_limit(p0):
                return True
        return False

    def _count(self, event: str, times: int = 1) -> None:
        if times:
            self.guard_events[event] = self.guard_events.get(event, 0) + times

    @property
    def adapted_names(self) -> List[str]:
        return [n for n, _ in self.adapted]

    # ---- source state ------------------------------------------------------------------------------------
    def _capture_state(self) -> Dict[str, Any]:
        module_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        optim_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        return {"module": module_state, "optimizer": optim_state}

    def reset(self) -> None:
        """Restore the model, every extra module and the optimizer to their state at construction, bit for bit."""
        self.load_state_dict(self._source_state["module"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._source_state["optimizer"]))
        self.reset_extra_state()

    def extra_repr(self) -> str:
        return f"method={self.name}, cfg={self.cfg}"


def register_adapter(name: str):
    """Class decorator: register an Adapter subclass under `name` (also sets its `name`)."""
    def decorator(cls):
        cls.name = name
        return ADAPTERS.register(name)(cls)
    return decorator


def create_adapter(name: str, model: nn.Module, cfg: Any = None, **config) -> Adapter:
    """Wrap `model` with the method registered as `name`; keyword arguments override its config defaults."""
    return ADAPTERS.get(name)(model, cfg, **config)


def list_adapters(pattern: str = "*") -> List[str]:
    return ADAPTERS.names(pattern)
