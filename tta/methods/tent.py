"""tent: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021, arXiv:2006.10726).

Minimises the mean entropy of the predictions on the test batch, updating only the affine parameters of the
normalisation layers, with batch-norm layers normalising by test-batch statistics. The prediction returned is
the one computed before the step's update, as in the authors' code.
Defaults: ImageNet setting, SGD lr 2.5e-4 (batch 64) momentum 0.9, one step, online.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..config import Fraction, Rate
from ..losses import require_class_scores, softmax_entropy
from ..params import enable_norm_affine, use_batch_statistics


@dataclass
class TentConfig(AdapterConfig):
    optimizer: str = "sgd"
    lr: Rate = 2.5e-4
    momentum: Fraction = 0.9


@register_adapter("tent")
class Tent(Adapter):
    Config = TentConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        if not enable_norm_affine(self.model):
            raise ValueError("tent adapts the affine parameters of normalisation layers, and this model has none; "
                             "use a model with BatchNorm/LayerNorm/GroupNorm or another method (e.g. memo)")

    def forward_and_adapt(self, x):
        outputs = self.model(x)
        require_class_scores(outputs, self.name)
        loss = softmax_entropy(outputs).mean()
        self.optimize(loss)
        return outputs
