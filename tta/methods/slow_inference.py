"""slow_inference: per-scene test-time adaptation by reconstruction (Prabhudesai, Goyal, Paul, van Steenkiste,
Sajjadi, Aggarwal, Kipf, Pathak, Fragkiadaki, "Test-time Adaptation with Slot-Centric Models", ICML 2023,
arXiv:2203.11194; the "slow inference" of generative-feedback networks).

A model that explains its input by reconstructing it (a slot-centric autoencoder, an MAE, any analysis-by-
synthesis model) is adapted on each test scene by gradient descent on its reconstruction loss alone, then its
task output (for slot models: the segmentation read from the slot masks) is read from the adapted model. The
source weights are restored before the next scene.
Defaults: the authors' code (github.com/mihirp1998/Slot-TTA, config/config.yaml), Adam lr 5e-4, up to 150 steps,
all parameters, reset after every scene, plus early stopping on the reconstruction loss (off when patience is 0).
Optimizer state: the authors' code rebuilds the model and the optimizer for every scene from the training
checkpoint, Adam state included (model_utils.get_model_and_optimizer loads state_dict["optimizer"]), so every
scene starts from the training run's moments and step count. Without `optimizer_state` every scene starts a
fresh optimizer (a named difference: a fresh Adam's first steps are bias-corrected from zero moments); with
`optimizer_state=<file>` (a torch.save'd optimizer state dict, or a checkpoint holding one under "optimizer" or
"optimizer_state_dict"), every scene's optimizer starts from that state, as there. Only the per-parameter state
is taken from the file: lr and the other settings stay the config's (the authors' checkpoint ends training at the
same constant lr, 5e-4, after its warm-up). With `restore_best` the prediction is read from the
weights of the lowest reconstruction loss seen on the scene rather than from the last step's (off by default, so
existing configs and ttt_mae, whose random masks make the loss too noisy to select on, keep their meaning).

Any model works that implements `ReconstructionModel`; `tta.nets.SlotAttentionAutoEncoder` is the reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from annotated_types import Interval, doc
from torch import nn

from ..adapter import Adapter, AdapterConfig, Optimizer, register_adapter
from ..config import MAX_STEPS, NonNegative, Rate, Steps


@runtime_checkable
class ReconstructionModel(Protocol):
    """What slow inference needs from a model.

    reconstruct(x) -> (reconstruction, extras): a differentiable reconstruction of x plus whatever the model
        wants to pass to its loss or expose (slot masks, the MAE mask).
    predict(x) -> the task output read after adaptation (slot masks, class logits, ...).
    Optionally reconstruction_loss(x, reconstruction, extras) -> per-example loss (B,); without it the loss is
    the per-example mean squared error between reconstruction and x.
    """

    def reconstruct(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...


def reconstruction_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's per-example reconstruction loss (B,) on x."""
    recon, extras = model.reconstruct(x)
    custom = getattr(model, "reconstruction_loss", None)
    if custom is not None:
        return custom(x, recon, extras)
    if recon.shape != x.shape:
        raise ValueError(f"reconstruct(x) returned shape {tuple(recon.shape)} for input {tuple(x.shape)}; give the "
                         "model a reconstruction_loss(x, reconstruction, extras) method when they differ")
    return F.mse_loss(recon, x, reduction="none").flatten(1).mean(1)


OPTIMIZER_STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"),
                        "adamw": ("exp_avg", "exp_avg_sq")}


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str, kind: str) -> None:
    """Load the per-parameter state (moments, step counts) saved at `path` into `optimizer`, keeping its own lr and
    other settings. The saved state must be that of the same kind of optimizer over the same parameters in the
    same order (the model's named_parameters() order, all of them for slow inference)."""
    saved = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True)
    for key in ("optimizer", "optimizer_state_dict"):  # a whole training checkpoint
        if isinstance(saved, dict) and key in saved:
            saved = saved[key]
    if not (isinstance(saved, dict) and "state" in saved and "param_groups" in saved):
        raise ValueError(f"optimizer_state {path!r} holds no optimizer state dict (a mapping with 'state' and "
                         "'param_groups', alone or under 'optimizer' / 'optimizer_state_dict')")
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    if ours != theirs:
        raise ValueError(f"optimizer_state {path!r} is for parameter groups of sizes {theirs}, this model's optimizer "
                         f"has {ours}: save the state of the same model's optimizer")
    needed = OPTIMIZER_STATE_KEYS[kind]
    if any(not all(k in s for k in needed) for s in saved["state"].values()):
        raise ValueError(f"optimizer_state {path!r} is not a {kind} state (it lacks {', '.join(needed)}); set "
                         "`optimizer` to the kind the state was saved from")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    for n, (p, i) in enumerate(zip(params, ids)):
        shapes = {k: tuple(v.shape) for k, v in saved["state"].get(i, {}).items() if k in needed}
        if any(shape != tuple(p.shape) for shape in shapes.values()):
            raise ValueError(f"optimizer_state {path!r}: the state of parameter {n} has shape {shapes}, the model's "
                             f"parameter {n} is {tuple(p.shape)}: save the state of the same model's optimizer")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)  # also casts the state to each parameter's device and dtype
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"optimizer_state {path!r} does not fit this model's optimizer: {e}") from e
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)  # the config's lr, betas, momentum, not the saved run's


@dataclass
class SlowInferenceConfig(AdapterConfig):
    steps: Steps = 150           # the most steps per scene; early stopping may end sooner
    episodic: bool = True        # reset after every scene
    optimizer: Optimizer = "adam"
    lr: Rate = 5e-4
    per_example: bool = True     # adapt on each scene of a batch on its own (the paper's setting)
    # stop after this many steps without a min_delta improvement; 0 = never stop early
    patience: Annotated[int, Interval(ge=0, le=MAX_STEPS), doc("0 turns early stopping off")] = 0
    min_delta: NonNegative = 0.0  # improvement of the reconstruction loss that resets the patience counter
    restore_best: bool = False   # predict with the weights of the lowest reconstruction loss seen, not the last ones
    optimizer_state: Optional[str] = None  # a file with the training run's optimizer state, loaded for every scene

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer_state is not None and not os.path.isfile(os.path.expanduser(self.optimizer_state)):
            raise ValueError(f"optimizer_state {self.optimizer_state!r} is not a file; give the path of a torch.save'd "
                             "optimizer state dict (or of a checkpoint holding it under 'optimizer'), or null for a "
                             "fresh optimizer per scene")


@register_adapter("slow_inference")
class SlowInference(Adapter):
    """Adapts all parameters on the reconstruction loss of each scene, then returns `model.predict(x)`.

    After a call, `loss_history` holds the per-step reconstruction losses of the last scene adapted (the loss
    before each update), for inspection. With `restore_best`, `final_loss` is the loss of the weights after the last
    update (evaluated once more, so that they compete too) and `best_step` says whose weights predicted: an index
    into `loss_history` (the weights before that step's update), or len(loss_history) for the final weights.
    """
    Config = SlowInferenceConfig

    def __init__(self, model: nn.Module, cfg=None, **overrides):
        if not isinstance(model, ReconstructionModel):
            raise TypeError(
                f"{self.name} needs a model that reconstructs its input: give {type(model).__name__} the methods "
                "reconstruct(x) -> (reconstruction, extras) and predict(x) -> output (and optionally "
                "reconstruction_loss(x, reconstruction, extras) -> (B,)), or use tta.nets.SlotAttentionAutoEncoder")
        super().__init__(model, cfg, **overrides)
        if self.cfg.optimizer_state is not None:
            # in the source snapshot (taken once __init__ returns): every reset (every scene) starts from it
            load_optimizer_state(self.optimizer, self.cfg.optimizer_state, self.cfg.optimizer)
        self.loss_history: List[float] = []
        self.final_loss: Optional[float] = None
        self.best_step: Optional[int] = None
        self._best_loss = float("inf")
        self._best_params: List[torch.Tensor] = []  # reused across scenes: one copy of the adapted parameters

    def configure_model(self):
        super().configure_model()
        self.model.requires_grad_(True)

    @property
    def one_example_per_call(self) -> bool:
        return self.cfg.per_example

    @property
    def split_batch(self) -> bool:
        return self.cfg.per_example  # one scene at a time; the base class resets after each when episodic

    def adaptation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The scalar minimised at each step."""
        return reconstruction_loss(self.model, x).mean()

    def forward_and_adapt(self, x):
        loss = self.adaptation_loss(x)
        if self.cfg.restore_best:
            # The loss belongs to the weights before this update: keep those, not the ones the step makes.
            self._keep_if_best(float(loss.detach()), step=len(self.loss_history))
        self.optimize(loss)  # guarded: a non-finite loss or gradient skips the update
        return loss.detach()

    @torch.no_grad()
    def _keep_if_best(self, loss: float, step: int) -> None:
        if not loss < self._best_loss:  # strict, and False for NaN: the earliest of equal losses wins
            return
        params = [p for _, p in self.adapted_params]
        if len(self._best_params) != len(params) or any(
                b.shape != p.shape or b.device != p.device or b.dtype != p.dtype
                for b, p in zip(self._best_params, params)):
            self._best_params = [torch.empty_like(p) for p in params]
        for b, p in zip(self._best_params, params):
            b.copy_(p)
        self._best_loss, self.best_step = loss, step

    def adapt_and_predict(self, x):
        self.loss_history, self.final_loss, self.best_step = [], None, None
        self._best_loss = float("inf")
        if self.cfg.steps > 0:
            with torch.enable_grad():  # adapt even when called under torch.no_grad()
                best, waited = float("inf"), 0
                for _ in range(self.cfg.steps):
                    loss = float(self.forward_and_adapt(x))
                    self.loss_history.append(loss)
                    if loss < best - self.cfg.min_delta:
                        best, waited = loss, 0
                    else:
                        waited += 1
                    if self.cfg.patience and waited >= self.cfg.patience:
                        break
            if self.cfg.restore_best:
                self._restore_best(x)
        return self.predict_guarded(lambda: self.model.predict(x))

    @torch.no_grad()
    def _restore_best(self, x: torch.Tensor) -> None:
        """Load the weights of the lowest loss seen; the last update's weights compete through one more loss."""
        self.final_loss = float(self.adaptation_loss(x))
        if self.final_loss < self._best_loss or self.best_step is None:
            self._best_loss, self.best_step = self.final_loss, len(self.loss_history)
            return
        for b, (_, p) in zip(self._best_params, self.adapted_params):
            p.copy_(b)
        # The optimizer's moments stay those of the last step; only online use (episodic off) carries them on.
