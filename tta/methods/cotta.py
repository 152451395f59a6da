"""cotta: continual test-time adaptation (Wang et al., CVPR 2022, arXiv:2203.13591).

A student (the adapted model) learns from a mean teacher (an EMA of the student):
- the teacher's prediction is averaged over `n_augmentations` augmented views when the frozen source model
  (the anchor) is not confident (mean max-probability below `confidence_threshold`);
- the student minimises the cross-entropy to the teacher's soft prediction, BN uses test-batch statistics;
- the teacher follows the student by EMA, and each adapted weight is restored to its source value with probability
  `restore_prob` per step (stochastic restore, against forgetting).
The prediction returned is the teacher's.

Presets (`preset`; a field given explicitly wins), from the authors' code (qinenergy/cotta):
- "tta" (the default): the CIFAR-10-C hyperparameters (cifar/cfgs/cifar10/cotta.yaml: Adam lr 1e-3, threshold 0.92,
  restore 0.01) with this library's augmentations (torchvision's colour jitter, a nearest-neighbour affine with black
  corners, a 3x3 blur below 64 pixels, no gamma) and every parameter adapted.
- "official-cifar10": those hyperparameters with the authors' augmentations (augment: official, see
  tta.augment.cotta_augment_official) and only parameters named weight or bias adapted (collect_params), as cifar/
  cotta.py. (That code also computes the 32 augmented views when the anchor is confident and then ignores them:
  it costs time and random draws, not results, and is not repeated here.)
- "official-imagenet": imagenet/cotta.py with cfgs/10orders/cotta/*.yaml: SGD lr 0.01 with Nesterov momentum 0.9,
  threshold 0.1, restore 0.001, the symmetric cross-entropy (loss: sce), the official augmentations, weight/bias only
  (on ViT and Swin, class tokens, position embeddings and relative-position tables stay fixed).
- "zoo-cifar10" and "zoo-imagenet": the TTA zoo's settings (mariodoebler/test-time-adaptation, classification/cfgs/
  cifar10_c/cotta.yaml and cfgs/imagenet_c/cotta.yaml over conf.py, methods/cotta.py), which are the official ones:
  Adam lr 1e-3 betas (0.9, 0.999) (OPTIM.BETA), restore 0.01 (COTTA.RST), threshold 0.92 (COTTA.AP), cross-entropy
  for CIFAR-10-C; SGD lr 0.01, momentum 0.9 with Nesterov (conf.py's OPTIM.NESTEROV), restore 0.001, threshold 0.1,
  the symmetric cross-entropy (chosen by data set name) for ImageNet-C; both with teacher EMA 0.999
  (M_TEACHER.MOMENTUM), 32 views (TEST.N_AUGMENTATIONS), no weight decay, one step, online. The zoo optimizes and
  restores the parameters named weight or bias (its base collect_params) while its teacher follows every parameter,
  as here. Its augmentations (augmentations/transforms_cotta.py get_tta_transforms, soft=False) are the authors':
  the same colour jitter with gamma, edge padding, bilinear affine (fill 0, as the authors' default), 5x5 blur,
  centre crop, flip and noise, drawn in the same order, so these presets use augment: official. The zoo, like this
  library and unlike the authors' CIFAR code, computes the views only when the anchor is unsure.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import torch

from ..adapter import Adapter, AdapterConfig, Optimizer, register_adapter
from ..augment import check_cotta_size, cotta_augment, cotta_augment_official
from ..config import Fraction, Rate, Views, fill_from_preset, named_by
from ..losses import cross_entropy_soft, require_class_scores, symmetric_cross_entropy
from ..params import ema_update, use_batch_statistics

Loss = Literal["ce", "sce"]  # sce: symmetric cross-entropy (official-imagenet)
Augment = Literal["tta", "official"]  # tta.augment.cotta_augment / cotta_augment_official
Adapted = Literal["all", "weight_bias"]  # weight_bias: the parameters named weight or bias, as the authors' code
LOSSES = named_by(Loss, {"ce": cross_entropy_soft, "sce": symmetric_cross_entropy})
AUGMENTATIONS = named_by(Augment, {"tta": cotta_augment, "official": cotta_augment_official})
Preset = Literal["tta", "official-cifar10", "official-imagenet", "zoo-cifar10", "zoo-imagenet"]
_CIFAR = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "nesterov": False, "restore_prob": 0.01,
          "confidence_threshold": 0.92, "loss": "ce"}
PRESETS: Dict[str, Dict[str, Any]] = {
    "tta": {**_CIFAR, "adapt": "all", "augment": "tta"},
    "official-cifar10": {**_CIFAR, "adapt": "weight_bias", "augment": "official"},      # cifar/cotta.py
    "official-imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "restore_prob": 0.001,
                          "confidence_threshold": 0.1, "loss": "sce", "adapt": "weight_bias",
                          "augment": "official"},                                        # imagenet/cotta.py
}
PRESETS["zoo-cifar10"] = PRESETS["official-cifar10"]      # zoo cfgs/cifar10_c/cotta.yaml: the same values
PRESETS["zoo-imagenet"] = PRESETS["official-imagenet"]    # zoo cfgs/imagenet_c/cotta.yaml: the same values


@dataclass
class CoTTAConfig(AdapterConfig):
    preset: Preset = "tta"
    optimizer: Optional[Optimizer] = None  # None: the preset's (adam; sgd for official-imagenet, zoo-imagenet)
    lr: Optional[Rate] = None          # None: the preset's (1e-3; 0.01 for official-imagenet)
    momentum: Optional[Fraction] = None
    nesterov: Optional[bool] = None
    ema_momentum: Fraction = 0.999
    restore_prob: Optional[Fraction] = None          # 0.01; 0.001 for official-imagenet
    confidence_threshold: Optional[Fraction] = None  # compared with the anchor's mean largest class probability
    n_augmentations: Views = 32
    loss: Optional[Loss] = None        # None: the preset's (ce; sce for official-imagenet, zoo-imagenet)
    adapt: Optional[Adapted] = None    # None: the preset's (all; weight_bias for official-*, zoo-*)
    augment: Optional[Augment] = None  # None: the preset's (tta; official for official-*, zoo-*)

    def __post_init__(self):
        fill_from_preset(self, PRESETS)
        super().__post_init__()


@register_adapter("cotta")
class CoTTA(Adapter):
    Config = CoTTAConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.cfg.adapt == "all" or name.rsplit(".", 1)[-1] in ("weight", "bias"))
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
                augment = AUGMENTATIONS[self.cfg.augment]
                views = [self.teacher(augment(x)) for _ in range(self.cfg.n_augmentations)]
                teacher_outputs = torch.stack(views).mean(0)
        loss = LOSSES[self.cfg.loss](outputs, teacher_outputs).mean()
        self.optimize(loss)
        ema_update(self.teacher, self.model, self.cfg.ema_momentum)
        self._stochastic_restore()
        return teacher_outputs

    @torch.no_grad()
    def _stochastic_restore(self):
        source = self.source_state_dict
        for name, p in self.adapted_params:
            restore = torch.rand_like(p) < self.cfg.restore_prob
            p.copy_(torch.where(restore, source[f"model.{name}"], p))
