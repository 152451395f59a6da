"""cotta: continual test-time adaptation (Wang et al., CVPR 2022, arXiv:2203.13591).

A student (the adapted model) learns from a mean teacher (an EMA of the student):
- the teacher's prediction is averaged over `n_augmentations` augmented views when the frozen source model
  (the anchor) is not confident (mean max-probability below `confidence_threshold`);
- the student minimises the cross-entropy to the teacher's soft prediction, all parameters adapt, BN uses
  test-batch statistics;
- the teacher follows the student by EMA, and each weight is restored to its source value with probability
  `restore_prob` per step (stochastic restore, against forgetting).
The prediction returned is the teacher's. Defaults are the CIFAR-10-C setting (Adam 1e-3, threshold 0.92);
ImageNet-C used SGD lr 0.01 and threshold 0.1.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..augment import check_cotta_size, cotta_augment
from ..config import Fraction, Rate, Views
from ..losses import cross_entropy_soft, require_class_scores
from ..params import ema_update, use_batch_statistics


@dataclass
class CoTTAConfig(AdapterConfig):
    optimizer: str = "adam"
    lr: Rate = 1e-3
    ema_momentum: Fraction = 0.999
    restore_prob: Fraction = 0.01
    confidence_threshold: Fraction = 0.92  # compared with the anchor's mean largest class probability
    n_augmentations: Views = 32


@register_adapter("cotta")
class CoTTA(Adapter):
    Config = CoTTAConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        self.model.requires_grad_(True)
        # Submodules of the adapter, so the base class snapshot and reset() cover them too.
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)

    def check_input(self, x):
        x = super().check_input(x)
        # Augmentation runs only when the anchor is unsure, after the model has run: refuse small images up front,
        # so that the refusal never depends on the anchor's confidence and never follows an update.
        check_cotta_size(x)
        return x

    def forward_and_adapt(self, x):
        outputs = self.model(x)
        require_class_scores(outputs, self.name)
        with torch.no_grad():
            anchor_confidence = self.anchor(x).softmax(1).max(1)[0].mean()
            teacher_outputs = self.teacher(x)
            if anchor_confidence < self.cfg.confidence_threshold:
                views = [self.teacher(cotta_augment(x)) for _ in range(self.cfg.n_augmentations)]
                teacher_outputs = torch.stack(views).mean(0)
        loss = cross_entropy_soft(outputs, teacher_outputs).mean()
        self.optimize(loss)
        ema_update(self.teacher, self.model, self.cfg.ema_momentum)
        self._stochastic_restore()
        return teacher_outputs

    @torch.no_grad()
    def _stochastic_restore(self):
        source = self._source_state["module"]
        for name, p in self.adapted:
            restore = torch.rand_like(p) < self.cfg.restore_prob
            p.copy_(torch.where(restore, source[f"model.{name}"], p))
