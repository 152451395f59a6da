"""sar: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023, arXiv:2302.12400).

Builds on TENT. Per step:
1. entropy of the test batch; samples with entropy >= e_margin (0.4 ln K) are dropped (reliable filtering);
2. a sharpness-aware (SAM) update: perturb the weights by rho * g / ||g||, recompute the entropy there, filter
   again, and step the base SGD optimizer with the gradient at the perturbed point;
3. model recovery: an exponential moving average of the second loss below `reset_constant` signals collapse
   and restores the source weights.
Adapts the affine parameters of normalisation layers except those of the top blocks (the paper's choice:
their statistics are unreliable); BN normalises with test-batch statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..config import Fraction, NonNegative, Rate
from ..losses import require_class_scores, softmax_entropy
from ..params import enable_norm_affine, use_batch_statistics


@dataclass
class SARConfig(AdapterConfig):
    optimizer: str = "sgd"
    lr: Rate = 2.5e-4
    momentum: Fraction = 0.9
    rho: NonNegative = 0.05            # SAM neighbourhood radius
    e_margin_scale: Fraction = 0.4     # e_margin = e_margin_scale * ln(K); entropies never exceed ln(K)
    reset_constant: NonNegative = 0.2  # recover the source model when the loss EMA falls below this
    exclude: Tuple[str, ...] = ("*layer4*", "*blocks.9*", "*blocks.10*", "*blocks.11*", "norm", "*.norm", "head*")


@register_adapter("sar")
class SAR(Adapter):
    Config = SARConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        if not enable_norm_affine(self.model, self.cfg.exclude):
            raise ValueError("sar found no normalisation layers to adapt outside its `exclude` patterns "
                             f"{self.cfg.exclude}; pass exclude=() or use another method")
        self.recoveries = 0  # counts model recoveries over the adapter's life; reset() keeps it
        self.reset_extra_state()

    def reset_extra_state(self):
        self.loss_ema: Optional[float] = None

    def _entropy(self, x):
        outputs = self.model(x)
        require_class_scores(outputs, self.name)
        entropy = softmax_entropy(outputs)
        return outputs, entropy.reshape(entropy.shape[0], -1).mean(1)

    def forward_and_adapt(self, x):
        outputs, entropy = self._entropy(x)
        e_margin = self.cfg.e_margin_scale * math.log(outputs.shape[1])
        reliable = entropy < e_margin
        if not reliable.any():
            return outputs
        entropy[reliable].mean().backward()
        params = [p for _, p in self.adapted]
        originals = self._ascend(params)
        _, entropy2 = self._entropy(x)
        entropy2 = entropy2[reliable]
        still_reliable = entropy2.detach() < e_margin
        loss2 = entropy2[still_reliable].mean() if still_reliable.any() else None
        if loss2 is not None:
            loss2.backward()
        with torch.no_grad():  # back to the original weights; the descent uses the gradient from the perturbed point
            for p, original in zip(params, originals):
                p.copy_(original)
        if loss2 is not None and self.step_guarded(float(loss2.detach())):  # guarded: non-finite gradients skip it
            self._track(float(loss2.detach()))
        self.optimizer.zero_grad()
        return outputs

    @torch.no_grad()
    def _ascend(self, params):
        """SAM's first step: move to the worst point of the rho-ball; returns copies of the weights before it."""
        originals = [p.detach().clone() for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        grad_norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
        scale = self.cfg.rho / (grad_norm + 1e-12)
        for p, g in zip(params, grads):
            p.add_(g * scale)
        self.optimizer.zero_grad()
        return originals

    def _track(self, loss: float) -> None:
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        if self.loss_ema < self.cfg.reset_constant:  # collapse: recover the source model
            self.recoveries += 1
            self.reset()
