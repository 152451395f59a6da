"""memo: test-time robustness via adaptation and augmentation (Zhang et al., NeurIPS 2022, arXiv:2110.09506).

For each test example on its own: draw `n_augmentations` AugMix views (after a random resized crop and flip),
minimise the entropy of the prediction averaged over the views (the marginal entropy) with respect to all
parameters, then predict the original example with the adapted model. Episodic: the source weights are
restored after every example. BN keeps its source statistics (the paper's plain variant).
Defaults: the ImageNet ResNet-50 setting, SGD lr 2.5e-4, one step, 64 views.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import Adapter, AdapterConfig, check_batch, register_adapter
from ..augment import memo_augment
from ..config import Fraction, Rate, Views
from ..losses import marginal_entropy, require_class_scores


@dataclass
class MEMOConfig(AdapterConfig):
    episodic: bool = True
    optimizer: str = "sgd"
    lr: Rate = 2.5e-4
    momentum: Fraction = 0.9
    n_augmentations: Views = 64


@register_adapter("memo")
class MEMO(Adapter):
    Config = MEMOConfig
    one_example_per_call = True

    def configure_model(self):
        super().configure_model()
        self.model.requires_grad_(True)

    def forward(self, x):
        check_batch(x)
        # MEMO adapts on one example at a time; the base class resets after each one when episodic.
        return torch.cat([super(MEMO, self).forward(example) for example in x.split(1)])

    def adapt_and_predict(self, x):
        if self.cfg.steps > 0:
            super().adapt_and_predict(x)
        with torch.no_grad():
            return self.model(x)

    def forward_and_adapt(self, x):
        views = memo_augment(x[0], self.cfg.n_augmentations)
        outputs = self.model(views)
        require_class_scores(outputs, self.name)
        loss = marginal_entropy(outputs)
        self.optimize(loss)
        return outputs
