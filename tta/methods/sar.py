"""sar: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023, arXiv:2302.12400).

Builds on TENT. Per step:
1. entropy of the test batch; samples with entropy >= e_margin (0.4 ln K) are dropped (reliable filtering);
2. a sharpness-aware (SAM) update: perturb the weights by rho * g / ||g||, recompute the entropy there, filter
   again, and step the base SGD optimizer with the gradient at the perturbed point;
3. model recovery: an exponential moving average of the second loss below `reset_constant` signals collapse
   and restores the source weights.
Adapts the affine parameters of normalisation layers except those of the top blocks (the paper's choice:
their statistics are unreliable); BN normalises with test-batch statistics. The `exclude` patterns (fnmatch) are
matched against the module names of the network itself (inside a tta wrapper, without its `net.` prefix), so that
they read as the network's own names (timm's, torchvision's).

Presets (`preset`; a field given explicitly wins), after the authors' code (mr-eggplant/SAR sar.py, main.py):
- "tta" (the default): SGD lr 2.5e-4, momentum 0.9 (main.py for ResNet-50 at batch 64 and more); no step when no
  sample is reliable; a recovery restores the weights, the optimizer state and the loss EMA; exclude adds `*.norm`
  (every module named norm) and `head*` to the authors' top blocks.
- "official": the authors' code with its quirks, each one changing results: the descent step is taken even when no
  sample is reliable (zero gradients, so SGD's momentum alone moves the weights: always_step); a recovery restores
  the weights only, keeping SGD's momentum buffers (their SAM reloads its own state, not its base optimizer's) and
  the low loss EMA, so it recovers again at every step until the EMA climbs back over reset_constant
  (recovery: official); the authors' collect_params rules as patterns: a module whose name contains layer4,
  blocks.9, blocks.10, blocks.11 or "norm." is left out, and one named exactly norm. Its lr, 2.5e-4, is the authors'
  for ResNets at batch 32 or more; `lr_rule: official` applies their whole rule (main.py) at the first batch:
  1e-3 x batch / 64 for networks without batch or group norm (their ViT-Base), else 2.5e-4, or 2.5e-4 x batch / 32
  below batch 32.
- "zoo-cifar10": the TTA zoo's CIFAR-10-C setting (mariodoebler/test-time-adaptation, cfgs/cifar10_c/sar.yaml and
  methods/sar.py): SAM over SGD lr 1e-3, momentum 0.9; the official patterns and step; a recovery keeps SGD's
  momentum but clears the loss EMA (recovery: zoo).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

import torch
from torch import nn

from ..adapter import Adapter, AdapterConfig, Optimizer, register_adapter
from ..config import Fraction, NonNegative, Rate, fill_from_preset
from ..losses import require_class_scores, softmax_entropy
from ..params import enable_norm_affine, network_of, use_batch_statistics

Preset = Literal["tta", "official", "zoo-cifar10"]
Recovery = Literal["source", "official", "zoo"]  # what a recovery restores (see the module docstring)
LrRule = Literal["fixed", "official"]  # fixed: lr; official: the authors' lr from the first batch's size
TOP_BLOCKS = ("*layer4*", "*blocks.9*", "*blocks.10*", "*blocks.11*")  # ResNet layer4, ViT-Base blocks 9-11
_SGD = {"optimizer": "sgd", "momentum": 0.9, "nesterov": False}
_OFFICIAL = {**_SGD, "exclude": TOP_BLOCKS + ("*norm.*", "norm"), "always_step": True}
PRESETS: Dict[str, Dict[str, Any]] = {
    "tta": {**_SGD, "lr": 2.5e-4, "exclude": TOP_BLOCKS + ("norm", "*.norm", "head*"), "always_step": False,
            "recovery": "source"},
    "official": {**_OFFICIAL, "lr": 2.5e-4, "recovery": "official"},        # mr-eggplant/SAR
    "zoo-cifar10": {**_OFFICIAL, "lr": 1e-3, "recovery": "zoo"},             # zoo cfgs/cifar10_c/sar.yaml
}


@dataclass
class SARConfig(AdapterConfig):
    preset: Preset = "tta"
    optimizer: Optional[Optimizer] = None  # None: the preset's (sgd: SAM's base optimizer)
    lr: Optional[Rate] = None          # None: the preset's (2.5e-4; 1e-3 for zoo-cifar10)
    momentum: Optional[Fraction] = None
    nesterov: Optional[bool] = None
    rho: NonNegative = 0.05            # SAM neighbourhood radius
    e_margin_scale: Fraction = 0.4     # e_margin = e_margin_scale * ln(K); entropies never exceed ln(K)
    reset_constant: NonNegative = 0.2  # recover the source model when the loss EMA falls below this
    exclude: Optional[Tuple[str, ...]] = None  # norm layers left out (fnmatch on the network's module names)
    always_step: Optional[bool] = None  # take the descent step without reliable samples (official: momentum moves)
    recovery: Optional[Recovery] = None  # None: the preset's (source; official, zoo for those presets)
    lr_rule: LrRule = "fixed"

    def __post_init__(self):
        fill_from_preset(self, PRESETS)
        super().__post_init__()
        self.exclude = tuple(self.exclude)


@register_adapter("sar")
class SAR(Adapter):
    Config = SARConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        if not enable_norm_affine(network_of(self.model), self.cfg.exclude):
            raise ValueError("sar found no normalisation layers to adapt outside its `exclude` patterns "
                             f"{self.cfg.exclude}; pass exclude=() or use another method")
        self.recoveries = 0  # counts model recoveries over the adapter's life; reset() keeps it
        self.ruled_lr: Optional[float] = None  # lr_rule official: set at the first batch, kept by reset()
        self.reset_extra_state()

    def reset_extra_state(self):
        self.loss_ema: Optional[float] = None
        self._apply_ruled_lr()  # reset() reloaded the optimizer with the construction lr

    def _apply_ruled_lr(self) -> None:
        if self.ruled_lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.ruled_lr

    def official_lr(self, batch_size: int) -> float:
        """mr-eggplant/SAR main.py: 1e-3 x batch / 64 for ViT-Base, else 2.5e-4, or 2.5e-4 x batch / 32 below batch
        32 (its ResNet-50 with batch or group norm); a network without batch or group norm counts as a ViT."""
        resnet = any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) for m in self.model.modules())
        if not resnet:
            return 0.001 / 64 * batch_size
        return 0.00025 / 64 * batch_size * 2 if batch_size < 32 else 0.00025

    def _entropy(self, x):
        outputs = self.model(x)
        require_class_scores(outputs, self.name)
        entropy = softmax_entropy(outputs)
        return outputs, entropy.reshape(entropy.shape[0], -1).mean(1)

    def forward_and_adapt(self, x):
        if self.cfg.lr_rule == "official" and self.ruled_lr is None:
            self.ruled_lr = self.official_lr(x.shape[0])
            self._apply_ruled_lr()
        outputs, entropy = self._entropy(x)
        e_margin = self.cfg.e_margin_scale * math.log(outputs.shape[1])
        reliable = entropy < e_margin
        params = [p for _, p in self.adapted_params]
        loss2 = None
        if reliable.any():
            entropy[reliable].mean().backward()
            originals = self._ascend(params)
            _, entropy2 = self._entropy(x)
            entropy2 = entropy2[reliable]
            still_reliable = entropy2.detach() < e_margin
            loss2 = entropy2[still_reliable].mean() if still_reliable.any() else None
            if loss2 is not None:
                loss2.backward()
            with torch.no_grad():  # back to the original weights; the descent takes the gradient of the perturbed point
                for p, original in zip(params, originals):
                    p.copy_(original)
        if loss2 is not None:
            if self.step_guarded(float(loss2.detach())):  # guarded: non-finite gradients skip it
                self._update_ema(float(loss2.detach()))
        elif self.cfg.always_step:
            # The authors' code steps on the gradient of an empty mean, which is zero: SGD's momentum moves the weights
            for p in params:
                p.grad = torch.zeros_like(p)
            self.step_guarded()
        self.optimizer.zero_grad()
        if self.loss_ema is not None and self.loss_ema < self.cfg.reset_constant:  # collapse: recover
            self._recover()
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

    def _update_ema(self, loss: float) -> None:
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss

    def _recover(self) -> None:
        self.recoveries += 1
        if self.cfg.recovery == "source":
            self.reset()
            return
        loss_ema, optimizer_state = self.loss_ema, copy.deepcopy(self.optimizer.state_dict())
        self.reset()
        self.optimizer.load_state_dict(optimizer_state)  # the authors' SAM keeps its base SGD's momentum buffers
        if self.cfg.recovery == "official":
            self.loss_ema = loss_ema  # their forward() sets self.ema back after reset(): recovery repeats
