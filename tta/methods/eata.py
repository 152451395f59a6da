"""eata: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022, arXiv:2204.02610).

Builds on TENT (entropy minimisation of normalisation affine parameters) and adds
- reliable-sample selection: only samples with entropy below `e_margin` (0.4 ln K) update the model;
- redundancy removal: samples whose prediction is too close (|cos| >= d_margin) to a moving average of past
  predictions are skipped;
- re-weighting of the kept samples by 1 / exp(entropy - e_margin);
- an anti-forgetting Fisher regulariser alpha * sum F (theta - theta_0)^2, with F estimated on clean samples
  (`compute_fisher`, the mean over batches of the squared gradients of the cross-entropy to the model's own
  predictions, as the authors' main.py). Without Fisher data the method is the paper's ETA variant.

`fisher_data` names the clean images: "clean" (the benchmark's uncorrupted split) or a folder; `tta bench` computes
the Fisher information on `fisher_size` of them (2,000 in the paper) in batches of the benchmark's batch size before
the first test batch. Through the Python API, call `compute_fisher(batches)` yourself; an adapter whose config names
fisher_data refuses to adapt before that, so that it never runs as ETA while its config says EATA.

Presets (`preset`; a field given explicitly wins):
- "tta" (the default): the ImageNet hyperparameters of the authors' main.py (SGD lr 2.5e-4, momentum 0.9,
  d_margin 0.05, alpha 2000); reset() also clears the moving average of predictions.
- "official": the same, and reset() keeps the moving average as the authors' EATA.reset() does (it restores the
  weights and the optimizer only), which changes reset_per_shift runs after the first shift; only batch-norm layers
  adapt (norms: batch), as mr-eggplant/EATA eata.py's collect_params (BatchNorm2d alone).
- "zoo-cifar10": the TTA zoo's CIFAR-10-C setting (mariodoebler/test-time-adaptation cfgs/cifar10_c/eata.yaml):
  Adam lr 1e-3, d_margin 0.4, alpha 1, 2,000 source images.
- "zoo-imagenet": the zoo's ImageNet-C setting (cfgs/imagenet_c/eata.yaml): the official hyperparameters with the
  zoo's default Nesterov momentum.
Every preset but official adapts the affine parameters of every normalisation layer (norms: all): on a LayerNorm or
GroupNorm network that is how EATA was run by the SAR authors (mr-eggplant/SAR eata.py: BatchNorm2d, GroupNorm,
LayerNorm) and by the zoo (methods/eata.py: BatchNorm1d/2d, LayerNorm, GroupNorm); on a batch-norm network every
preset adapts the same parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Dict, Iterable, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from annotated_types import Interval, doc

from ..adapter import Adapter, AdapterConfig, Optimizer, register_adapter
from ..config import Fraction, NonNegative, Rate, fill_from_preset
from ..losses import require_class_scores, softmax_entropy
from ..params import NormKind, enable_norm_affine, use_batch_statistics

_IMAGENET = {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": False, "d_margin": 0.05,
             "fisher_alpha": 2000.0}
Preset = Literal["tta", "official", "zoo-cifar10", "zoo-imagenet"]
PRESETS: Dict[str, Dict[str, Any]] = {
    "tta": {**_IMAGENET, "keep_average_on_reset": False, "norms": "all"},
    "official": {**_IMAGENET, "keep_average_on_reset": True, "norms": "batch"},  # mr-eggplant/EATA main.py, eata.py
    "zoo-cifar10": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "nesterov": False, "d_margin": 0.4,
                    "fisher_alpha": 1.0, "keep_average_on_reset": False, "norms": "all"},  # zoo cifar10_c/eata.yaml
    "zoo-imagenet": {**_IMAGENET, "nesterov": True, "keep_average_on_reset": False, "norms": "all"},  # imagenet_c
}


@dataclass
class EATAConfig(AdapterConfig):
    preset: Preset = "tta"
    optimizer: Optional[Optimizer] = None  # None: the preset's (sgd; adam for zoo-cifar10)
    lr: Optional[Rate] = None          # None: the preset's (2.5e-4; 1e-3 for zoo-cifar10)
    momentum: Optional[Fraction] = None
    nesterov: Optional[bool] = None
    e_margin_scale: Fraction = 0.4     # e_margin = e_margin_scale * ln(K); entropies never exceed ln(K)
    d_margin: Optional[Fraction] = None         # cosine-similarity threshold for redundant samples (0.05; 0.4 zoo)
    fisher_alpha: Optional[NonNegative] = None  # weight of the Fisher regulariser (2000; 1 for zoo-cifar10)
    # clean images for the Fisher information: "clean" (the benchmark's uncorrupted split) or a folder; None: ETA
    fisher_data: Optional[str] = None
    fisher_size: Annotated[int, Interval(ge=1, le=10_000_000), doc("clean images for the Fisher")] = 2000
    keep_average_on_reset: Optional[bool] = None  # reset() keeps the moving average of predictions (official)
    norms: Optional[NormKind] = None   # the normalisation layers adapted: all or batch (batch for official)

    def __post_init__(self):
        fill_from_preset(self, PRESETS)
        super().__post_init__()
        if self.fisher_data is not None and not self.fisher_data.strip():
            raise ValueError("eata: fisher_data is empty; give \"clean\" (the benchmark's uncorrupted images) or a "
                             "folder of clean images, or leave it out to run ETA (no Fisher regulariser)")


@register_adapter("eata")
class EATA(Adapter):
    Config = EATAConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        if not enable_norm_affine(self.model, kinds=self.cfg.norms):
            if self.cfg.norms == "batch":
                raise ValueError("eata: norms is 'batch' (batch-norm layers only, as the authors' collect_params and "
                                 "the official preset) and this model has none; set norms: all, or use the tta or "
                                 "zoo-* presets, to adapt its LayerNorm/GroupNorm layers")
            raise ValueError("eata adapts normalisation layers and this model has none; use memo or cotta")
        self.fisher: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_extra_state()

    def reset_extra_state(self):
        if not (self.cfg.keep_average_on_reset and hasattr(self, "average_probs")):
            self.average_probs: Optional[torch.Tensor] = None
        self.num_reliable = 0
        self.num_updated = 0

    @property
    def variant(self) -> str:
        """"eata", or "eta" while no Fisher information is loaded (the paper's variant without the regulariser)."""
        return "eata" if self.fisher else "eta"

    def compute_fisher(self, batches: Iterable[torch.Tensor]) -> None:
        """Diagonal Fisher of the adapted parameters on clean images, with the model's own predictions as labels."""
        params = dict(self.adapted_params)
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
        if self.cfg.fisher_data is not None and not self.fisher:
            raise ValueError(f"eata: fisher_data is {self.cfg.fisher_data!r}, but no Fisher information was computed; "
                             "call adapter.compute_fisher(batches of clean images) before adapting (tta bench does "
                             "it), or leave fisher_data out to run ETA")
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
        return sum((self.fisher[n][0] * (p - self.fisher[n][1]) ** 2).sum() for n, p in self.adapted_params)

    def _update_average(self, new_probs: torch.Tensor) -> None:
        if new_probs.shape[0] == 0:
            return
        mean = new_probs.mean(0)
        self.average_probs = mean if self.average_probs is None else 0.9 * self.average_probs + 0.1 * mean
