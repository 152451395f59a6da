"""it3: idempotent test-time training (Durasov, Shocher, Oner, Chechik, Efros, Fua, ICML 2025, arXiv:2410.04201).

Builds on idempotent generative networks (Shocher et al., ICLR 2024): a network f(x, y) trained to predict the
label from x alone (y = 0) and from x plus the label (see `tta.nets.IT3Net` and `it3_training_loss`) should be
idempotent on in-distribution inputs, f(x, f(x, 0)) = f(x, 0). At test time the method makes it so on the test
input: y0 = f_theta(x, 0), y1 = F(x, y0), minimise ||y1 - y0|| with respect to theta, where F is a frozen copy
of the source model (the paper's per-example setting) or an EMA of f_theta (the online variant). Gradients
reach theta through y0 directly and through F's input, never F's weights: pulling F's weights along would let
both sides drift together towards a trivial fixed point.
All parameters of f adapt (the embedding of y included); BN layers keep their source statistics.
Defaults: Adam lr 1e-3, one step (the paper uses 1 to 10), episodic, frozen anchor, MSE between signals.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ..adapter import Adapter, AdapterConfig, Optimizer, register_adapter
from ..config import Fraction, Rate
from ..losses import per_sample
from ..nets.it3_conditioning import IT3Net
from ..params import ema_update

Anchor = Literal["frozen", "ema"]
Distance = Literal["mse", "js"]
Prediction = Literal["first", "second"]
DISTANCES = get_args(Distance)


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between softmax(a) and softmax(b) over dim 1; shape (B,) or (B, H, W)."""
    log_a, log_b = logits_a.log_softmax(1), logits_b.log_softmax(1)
    log_m = torch.logaddexp(log_a, log_b) - torch.log(torch.tensor(2.0, dtype=log_a.dtype, device=log_a.device))
    kl_am = (log_a.exp() * (log_a - log_m)).sum(1)
    kl_bm = (log_b.exp() * (log_b - log_m)).sum(1)
    return 0.5 * (kl_am + kl_bm)


def idempotence_loss(model: IT3Net, anchor: nn.Module, x: torch.Tensor, distance: str = "mse"):
    """Per-example ||F(x, f(x, 0)) - f(x, 0)|| with f = `model`, F = `anchor`; returns (loss (B,), f(x, 0)).

    "mse" compares the signals (class probabilities or regression outputs), "js" the class distributions.
    Pass the model itself as `anchor` to measure how far from idempotent it is.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    y0 = model(x)
    y1 = anchor(x, model.signal(y0))
    if distance == "js":
        if model.task != "classification":
            raise ValueError("the Jensen-Shannon distance compares class distributions; use distance='mse' "
                             "for regression models")
        return per_sample(jensen_shannon(y1, y0)), y0
    return per_sample((model.signal(y1) - model.signal(y0)) ** 2), y0


@dataclass
class IT3Config(AdapterConfig):
    episodic: bool = True          # the paper adapts per test input and starts from the source model each time
    optimizer: Optimizer = "adam"
    lr: Rate = 1e-3
    anchor: Anchor = "frozen"      # frozen source copy (paper) | ema of the adapted model (online variant)
    ema_momentum: Fraction = 0.999  # anchor="ema" only
    distance: Distance = "mse"     # mse | js (classification only)
    predict: Prediction = "first"  # first: f(x, 0); second: f(x, f(x, 0)), both after adaptation

    def __post_init__(self):
        super().__post_init__()


@register_adapter("it3")
class IT3(Adapter):
    Config = IT3Config
    one_example_per_call = True  # the paper adapts per test input

    def __init__(self, model: nn.Module, cfg=None, **overrides):
        if not isinstance(model, IT3Net):
            raise TypeError(
                f"it3 needs a network that takes the label as a second input, got {type(model).__name__}. Wrap it "
                "with tta.nets.IT3Net(net, num_outputs=K, layer='<module name>') (or layer=None to concatenate y to "
                "the input) and train it with tta.nets.it3_training_loss before adapting.")
        super().__init__(model, cfg, **overrides)

    def configure_model(self):
        super().configure_model()
        self.model.requires_grad_(True)
        # A submodule, so the base class snapshot covers it and reset() restores it bit for bit.
        self.anchor = copy.deepcopy(self.model).eval().requires_grad_(False)

    def forward_and_adapt(self, x):
        loss, outputs = idempotence_loss(self.model, self.anchor, x, self.cfg.distance)
        self.optimize(loss.mean())  # guarded: a non-finite loss or gradient skips the update
        if self.cfg.anchor == "ema":
            ema_update(self.anchor, self.model, self.cfg.ema_momentum)
        return outputs

    def adapt_and_predict(self, x):
        with torch.enable_grad():  # adapt even when called under torch.no_grad()
            for _ in range(self.cfg.steps):
                self.forward_and_adapt(x)

        def predict():
            y0 = self.model(x)
            return y0 if self.cfg.predict == "first" else self.model(x, self.model.signal(y0))
        # The prediction is read from the adapted model, not from the pass that computed the last loss, and the
        # guard judges that prediction: the state after the last update is the one that may have diverged.
        return self.predict_guarded(predict)
