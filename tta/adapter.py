"""The Adapter base class: a drop-in for `model(x)` that adapts the model on x and returns the prediction.

A method subclasses `Adapter`, declares its `Config` dataclass with the paper's defaults and writes
`configure_model` (which layers train, which statistics normalise), `collect_params` (what the optimizer
updates) and `forward_and_adapt` (one step). The base class owns the snapshot of the source state, `reset()`,
the optimizer and the episodic/online loop, so every method gets them right the same way; it applies the divergence
guard, whose rules are tta.guard's.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, get_args

import torch
from torch import nn

from .config import Beta, Fraction, Rate, Steps, check_config, make_config
from .guard import check_step_fits, collapsed_to_one_class, skipped_update, unusable
from .guard import finite_and_largest  # noqa: F401  (its old home: tests and callers import it from here)
from .registry import Registry

ADAPTERS = Registry("adapter")
Optimizer = Literal["sgd", "adam", "adamw"]  # a config field naming the optimizer
OPTIMIZERS = get_args(Optimizer)


@dataclass
class AdapterConfig:
    """Settings every method shares. Subclasses override the defaults with their paper's."""
    steps: Steps = 1               # optimizer steps per call
    episodic: bool = False         # restore the source state after every call (per-example / per-batch TTA)
    optimizer: Optimizer = "sgd"
    lr: Rate = 1e-3
    momentum: Fraction = 0.9       # SGD only
    nesterov: bool = False         # SGD only: Nesterov momentum (CoTTA's ImageNet code, the TTA zoo's ImageNet runs)
    weight_decay: Rate = 0.0
    betas: Tuple[Beta, Beta] = (0.9, 0.999)  # Adam / AdamW only
    guard: bool = True             # skip non-finite updates; restore the source state on divergence or collapse

    def __post_init__(self):
        check_config(self)  # types and declared ranges (tta.config), before the checks that combine fields
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            # torch refuses it only when the optimizer is built; say so while the config is read
            raise ValueError(f"nesterov applies to SGD with momentum > 0, got optimizer {self.optimizer!r} with "
                             f"momentum {self.momentum}; set optimizer: sgd and a momentum, or nesterov: false")
        self.betas = tuple(self.betas)


def build_optimizer(params: List[nn.Parameter], cfg: AdapterConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.nesterov)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    check_step_fits(optimizer)
    return optimizer


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


@contextlib.contextmanager
def running_stats_kept_on_refusal(module: nn.Module) -> Iterator[None]:
    """On a ValueError or TypeError (a refused input) inside the block, put back the running statistics and batch
    counters of the normalisation layers in training mode, the only state a forward pass changes."""
    kept = [(b, b.clone()) for m in module.modules() if m.training and getattr(m, "track_running_stats", False)
            for b in m.buffers(recurse=False)]
    try:
        yield
    except (ValueError, TypeError):
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
        raise


class _SnapshotWhenBuilt(type):
    """Runs Adapter._finish_setup once the most-derived __init__ has returned, so that the source state it snapshots
    holds everything a method builds in its own __init__ (a loaded optimizer state, counters), whatever the order
    in which that __init__ calls the base class's."""

    def __call__(cls, *args, **kwargs):
        adapter = super().__call__(*args, **kwargs)
        adapter._finish_setup()
        return adapter


class Adapter(nn.Module, metaclass=_SnapshotWhenBuilt):
    """Adapts `model` on each call and returns its prediction. The model is adapted in place."""
    Config = AdapterConfig
    name = "adapter"
    # True for methods whose setting is one example at a time (MEMO, Diffusion-TTA, IT3, slow inference): a caller
    # that streams data (tta run) then gives them one example per call, so progress and cost show per example.
    one_example_per_call: bool = False
    # True for methods that adapt on each example of a batch on its own (MEMO, slow inference): a call then runs the
    # whole loop, episodic reset included, once per example.
    split_batch: bool = False
    # True for methods whose call can report the model's outputs before each of its update steps and after the last
    # (Diffusion-TTA): a caller that sets `outputs_by_step` to a list gets them appended, steps + 1 entries per call,
    # so one run at N steps shows the accuracy after 0, 1, ..., N steps (tta bench's record_steps).
    records_steps: bool = False
    outputs_by_step: Optional[List[torch.Tensor]] = None

    def __init__(self, model: nn.Module, cfg: Any = None, *, modules: Optional[Dict[str, nn.Module]] = None,
                 **overrides):
        """`modules`: what the method holds besides the model (a diffusion judge), attached under those names before
        configure_model, so that they can adapt too."""
        super().__init__()
        self.cfg = make_config(self.Config, cfg, overrides)
        self.model = model
        for name, module in (modules or {}).items():
            self.add_module(name, module)
        self.configure_model()
        self.adapted_params: List[Tuple[str, nn.Parameter]] = self.collect_params()  # (name, parameter) updated
        params = [p for _, p in self.adapted_params]
        self.optimizer = self.build_optimizer(params) if params else None
        self.guard_events: Dict[str, int] = {}  # divergence-guard interventions over the adapter's life

    def _finish_setup(self) -> None:
        """The snapshot reset() restores, taken once the adapter is fully built (see _SnapshotWhenBuilt)."""
        self._source_state = self._capture_state()

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
        if self.split_batch:
            check_batch(x)  # a batch to split, before any example is adapted
            return torch.cat([self.adapt_call(example) for example in x.split(1)])
        return self.adapt_call(x)

    def adapt_call(self, x: torch.Tensor) -> torch.Tensor:
        """One adaptation on the batch x and its prediction: the checks, the loop, the episodic reset."""
        x = self.check_input(x)
        # Refusals found only once the network runs (a size it cannot take, outputs that are not class scores)
        # come after batch-norm layers in training mode counted the batch; they come in the first forward pass,
        # before any update, so putting those buffers back is all it takes for a refused input to change nothing.
        with running_stats_kept_on_refusal(self):
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
        if self.cfg.guard and self.diverged(outputs, lambda: self.model(x)):
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
        if self.cfg.guard and self.diverged(outputs, predict):
            self.reset()
            with torch.no_grad():
                outputs = predict()
        return outputs

    def optimize(self, loss: torch.Tensor) -> bool:
        """backward, step, zero_grad; with the guard on, a non-finite loss or gradient skips the update."""
        if self.cfg.guard and not torch.isfinite(loss.detach()).all():
            self.optimizer.zero_grad()
            self.count_guard_event("nonfinite_loss")
            return False
        loss.backward()
        return self.step_guarded()

    def step_guarded(self, loss: Optional[float] = None) -> bool:
        """The optimizer step on gradients already accumulated, then zero_grad; with the guard on, a non-finite
        gradient, or a non-finite `loss` (the value those gradients came from, when given), skips the update. For
        methods that accumulate gradients themselves before stepping."""
        skipped = skipped_update(loss, (p for _, p in self.adapted_params)) if self.cfg.guard else None
        if skipped:
            self.optimizer.zero_grad()
            self.count_guard_event(skipped)
            return False
        try:
            check_step_fits(self.optimizer)  # lr or dtype changed since construction: refuse before anything moves
        except ValueError:
            self.optimizer.zero_grad()
            raise
        self.optimizer.step()
        self.optimizer.zero_grad()
        return True

    def diverged(self, outputs: torch.Tensor, predict: Optional[Callable[[], torch.Tensor]] = None) -> bool:
        """Non-finite weights or outputs, exploded weights (tta.guard.unusable), or a collapse to one class."""
        names, source = {id(p): n for n, p in self.named_parameters()}, self._source_state["module"]
        why = unusable(((p, source.get(names.get(id(p)))) for _, p in self.adapted_params), outputs)
        if why:
            self.count_guard_event(why)
            return True
        if self.collapsed(outputs, predict):
            self.count_guard_event("collapsed")
            return True
        return False

    def collapsed(self, outputs: torch.Tensor, predict: Optional[Callable[[], torch.Tensor]] = None) -> bool:
        """Whether outputs show a collapse to one class (tta.guard.collapsed_to_one_class); `predict` gives the
        prediction on the same batch, run here with the source state for the rule's comparison with the source."""
        source = (lambda: self.predict_with_source(predict)) if predict is not None and self.adapted_params else None
        return collapsed_to_one_class(outputs, source)

    @torch.no_grad()
    def predict_with_source(self, predict: Callable[[], torch.Tensor]) -> torch.Tensor:
        """predict() with the source state swapped in for the call; the adapted state (weights and buffers, the
        optimizer and counters untouched) is put back afterwards, bit for bit."""
        current = self.state_dict()  # tensors that share storage with the module's own
        source = self._source_state["module"]
        kept = {k: current[k].clone() for k in source}
        try:
            for k, v in source.items():
                current[k].copy_(v)
            return predict()
        finally:
            for k, v in kept.items():
                current[k].copy_(v)

    def count_guard_event(self, event: str, times: int = 1) -> None:
        if times:
            self.guard_events[event] = self.guard_events.get(event, 0) + times

    @property
    def adapted_names(self) -> List[str]:
        return [n for n, _ in self.adapted_params]

    # ---- source state ------------------------------------------------------------------------------------
    @property
    def source_state_dict(self) -> Dict[str, torch.Tensor]:
        """state_dict() as it was at construction: what reset() restores (methods that pull weights back towards
        the source, as CoTTA's stochastic restore, read it; never write to it)."""
        return self._source_state["module"]

    def _capture_state(self) -> Dict[str, Any]:
        module_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        optim_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        return {"module": module_state, "optimizer": optim_state}

    def reset(self) -> None:
        """Restore the model, every extra module and the optimizer to their state at construction, bit for bit."""
        self.restore_source_modules()
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._source_state["optimizer"]))
        self.reset_extra_state()

    def restore_source_modules(self) -> None:
        """Load the snapshot into the modules; strict, as it holds every entry of state_dict() (methods that snapshot
        only part of their modules, as JudgedAdapter, override this)."""
        self.load_state_dict(self.source_state_dict)

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
