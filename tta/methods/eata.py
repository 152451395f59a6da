"""eata: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022, arXiv:2204.02610).

Builds on TENT (entropy minimisation of normalisation affine parameters) and adds
- reliable-sample selection: only samples with entropy below `e_margin` (0.4 ln K) update the model;
- redundancy removal: samples whose prediction is too close (|cos| >= d_margin) to a moving average of past
  predictions are skipped;
- re-weighting of the kept samples by 1 / exp(entropy - e_margin);
- an anti-forgetting Fisher regulariser alpha * sum F (theta - theta_0)^2, with F estimated on clean samples
  (`compute_fisher`). Without Fisher data the method is the paper's ETA variant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..config import Fraction, NonNegative, Rate
from ..losses import require_class_scores, softmax_entropy
from ..params import enable_norm_affine, use_batch_statistics


@dataclass
class EATAConfig(AdapterConfig):
    optimizer: str = "sgd"
    lr: Rate = 2.5e-4
    momentum: Fraction = 0.9
    e_margin_scale: Fraction = 0.4  # e_margin = e_margin_scale * ln(K); entropies never exceed ln(K)
    d_margin: Fraction = 0.05       # cosine-similarity threshold for redundant samples
    fisher_alpha: NonNegative = 2000.0  # weight of the Fisher regulariser


@register_adapter("eata")
class EATA(Adapter):
    Config = EATAConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        if not enable_norm_affine(self.model):
            raise ValueError("eata adapts normalisation layers and this model has none; use memo or cotta")
        self.fisher: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_extra_state()

    def reset_extra_state(self):
        self.average_probs: Optional[torch.Tensor] = None
        self.num_reliable = 0
        self.num_updated = 0

    def compute_fisher(self, batches: Iterable[torch.Tensor]) -> None:
        """Diagonal Fisher of the adapted parameters on clean images, with the model's own predictions as labels."""
        params = dict(self.adapted)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        with torch.enable_grad():
            for x in batches:
                outputs = self.model(x)
                loss = F.cross_entropy(outputs, outputs.argmax(1))
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        fisher[n] += g.detach() ** 2
                count += 1
        if count == 0:
            raise ValueError("compute_fisher needs at least one batch of clean images")
        self.fisher = {n: (fisher[n] / count, params[n].detach().clone()) for n in params}

    def forward_and_adapt(self, x):
        outputs = self.model(x)
        require_class_scores(outputs, self.name)
        e_margin = self.cfg.e_margin_scale * math.log(outputs.shape[1])
        entropy = softmax_entropy(outputs)
        entropy = entropy.reshape(entropy.shape[0], -1).mean(1)  # dense outputs: mean entropy per image
        probs = outputs.softmax(1).reshape(outputs.shape[0], outputs.shape[1], -1).mean(2)
        reliable = entropy < e_margin
        keep = reliable.clone()
        if self.average_probs is not None:
            similarity = F.cosine_similarity(self.average_probs.unsqueeze(0), probs, dim=1)
            keep &= similarity.abs() < self.cfg.d_margin
        self.num_reliable += int(reliable.sum())
        self.num_updated += int(keep.sum())
        self._update_average(probs[keep].detach() if self.average_probs is not None else probs[reliable].detach())
        if keep.any():
            coeff = torch.exp(-(entropy[keep].detach() - e_margin))
            loss = (entropy[keep] * coeff).mean()
            if self.fisher:
                loss = loss + self.cfg.fisher_alpha * self.fisher_penalty()
            self.optimize(loss)
        return outputs

    def fisher_penalty(self) -> torch.Tensor:
        return sum((self.fisher[n][0] * (p - self.fisher[n][1]) ** 2).sum() for n, p in self.adapted)

    def _update_average(self, new_probs: torch.Tensor) -> None:
        if new_probs.shape[0] == 0:
            return
        mean = new_probs.mean(0)
        self.average_probs = mean if self.average_probs is None else 0.9 * self.average_probs + 0.1 * mean
