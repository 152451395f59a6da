"""memo: test-time robustness via adaptation and augmentation (Zhang et al., NeurIPS 2022, arXiv:2110.09506).

For each test example on its own: draw `n_augmentations` AugMix views (after a random crop and flip),
minimise the entropy of the prediction averaged over the views (the marginal entropy) with respect to all
parameters, then predict the original example with the adapted model. Episodic: the source weights are
restored after every example.

Presets (`preset`; a field given explicitly wins), from the authors' code (zhangmarvin/memo):
- "tta" (the default): the ImageNet ResNet-50 hyperparameters (SGD lr 2.5e-4, one step, 64 views) with
  torchvision's AugMix (severity 3, 13 operations, black fill) and batch norm on its source statistics (the
  paper's plain variant).
- "official": imagenet-exps (script_test_in.py, test_calls/test_adapt.py): SGD lr 2.5e-4 without momentum, 64
  views, the authors' AugMix (augment: official, see tta.augment.memo_augment_official: severity 1, nine PIL
  operations, fill 128) after a random resized crop, and the batch-norm prior with strength 16 (prior_strength:
  each BN layer normalises with 16/17 of its source statistics and 1/17 of the batch's, while adapting on the views
  and while predicting the image; train_helpers._modified_bn_forward). Its RVT and ResNeXt runs used AdamW lr 1e-5,
  weight decay 0.01: set those fields.
- "official-cifar10": cifar-10-exps (test_calls/test_adapt.py): SGD lr 0.005 without momentum, 32 views, the
  authors' AugMix after RandomCrop(32, padding 4) and a flip (crop: pad4), no prior (their ResNet-26 uses group norm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Dict, Literal, Optional

import torch
from annotated_types import Interval, doc

from ..adapter import Adapter, AdapterConfig, Optimizer, register_adapter
from ..augment import MemoCrop, memo_augment, memo_augment_official
from ..config import LARGE, Fraction, Rate, Views, fill_from_preset, named_by
from ..losses import marginal_entropy, require_class_scores
from ..params import batch_norm_prior

Augment = Literal["tta", "official"]  # tta: torchvision's AugMix; official: the authors' AugMix
AUGMENTATIONS = named_by(Augment, {"tta": memo_augment, "official": memo_augment_official})
Preset = Literal["tta", "official", "official-cifar10"]
_OFFICIAL = {"optimizer": "sgd", "momentum": 0.0, "nesterov": False, "augment": "official"}
PRESETS: Dict[str, Dict[str, Any]] = {
    "tta": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": False, "n_augmentations": 64,
            "prior_strength": -1.0, "augment": "tta", "crop": "resized"},
    "official": {**_OFFICIAL, "lr": 2.5e-4, "n_augmentations": 64, "prior_strength": 16.0, "crop": "resized"},
    "official-cifar10": {**_OFFICIAL, "lr": 0.005, "n_augmentations": 32, "prior_strength": -1.0, "crop": "pad4"},
}


@dataclass
class MEMOConfig(AdapterConfig):
    preset: Preset = "tta"
    episodic: bool = True
    optimizer: Optional[Optimizer] = None  # None: the preset's (sgd)
    lr: Optional[Rate] = None          # None: the preset's (2.5e-4; 0.005 for official-cifar10)
    momentum: Optional[Fraction] = None  # 0.9; 0 for the official presets (one step: the same update)
    nesterov: Optional[bool] = None
    n_augmentations: Optional[Views] = None  # 64; 32 for official-cifar10
    # batch-norm prior N: BN mixes N parts source statistics with 1 part the batch's; -1: source statistics only
    prior_strength: Optional[Annotated[float, Interval(ge=-1, le=LARGE), doc("-1: no prior")]] = None
    augment: Optional[Augment] = None  # None: the preset's (tta; official for the official presets)
    crop: Optional[MemoCrop] = None    # resized (RandomResizedCrop, ImageNet) | pad4 (RandomCrop, 4 pixels, CIFAR)

    def __post_init__(self):
        fill_from_preset(self, PRESETS)
        super().__post_init__()
        self.prior_strength = float(self.prior_strength)


@register_adapter("memo")
class MEMO(Adapter):
    Config = MEMOConfig
    one_example_per_call = True
    split_batch = True  # MEMO adapts on one example at a time; the base class resets after each one when episodic

    def configure_model(self):
        super().configure_model()
        self.model.requires_grad_(True)

    def adapt_and_predict(self, x):
        with batch_norm_prior(self.model, self.cfg.prior_strength):  # for the views and for the prediction
            if self.cfg.steps > 0:
                super().adapt_and_predict(x)
            with torch.no_grad():
                return self.model(x)

    def forward_and_adapt(self, x):
        views = AUGMENTATIONS[self.cfg.augment](x[0], self.cfg.n_augmentations, self.cfg.crop)
        outputs = self.model(views)
        require_class_scores(outputs, self.name)
        loss = marginal_entropy(outputs)
        self.optimize(loss)
        return outputs
