"""tent: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021, arXiv:2006.10726).

Minimises the mean entropy of the predictions on the test batch, updating only the affine parameters of the
normalisation layers, with batch-norm layers normalising by test-batch statistics. The prediction returned is
the one computed before the step's update, as in the authors' code.

Presets (`preset`; a field given explicitly wins):
- "tta" (the default): the ImageNet setting, SGD lr 2.5e-4 (batch 64), momentum 0.9, one step, online.
- "zoo-cifar10": the TTA zoo's CIFAR-10-C setting (mariodoebler/test-time-adaptation, classification/cfgs/cifar10_c/
  tent.yaml over conf.py): Adam lr 1e-3, betas (0.9, 0.999), no weight decay, one step, online (batch 200 there).
- "zoo-imagenet": the zoo's ImageNet-C setting (cfgs/imagenet_c/tent.yaml): SGD lr 2.5e-4, momentum 0.9 and, from
  conf.py's OPTIM.NESTEROV, Nesterov momentum, no weight decay, one step, online (batch 64 there).
The zoo's methods/tent.py adapts the affine parameters of BatchNorm, LayerNorm and GroupNorm layers by entropy,
as here; batch sizes belong to the benchmark, not to the method's config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..config import Fraction, Rate, fill_from_preset
from ..losses import require_class_scores, softmax_entropy
from ..params import enable_norm_affine, use_batch_statistics


# Weight decay 0 and Adam's betas (0.9, 0.999), the zoo's WD and BETA, are every config's defaults.
_SGD = {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9}
PRESETS: Dict[str, Dict[str, Any]] = {
    "tta": {**_SGD, "nesterov": False},
    "zoo-cifar10": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "nesterov": False},  # cifar10_c/tent.yaml
    "zoo-imagenet": {**_SGD, "nesterov": True},                                             # imagenet_c/tent.yaml
}


@dataclass
class TentConfig(AdapterConfig):
    preset: str = "tta"                # tta | zoo-cifar10 | zoo-imagenet
    optimizer: Optional[str] = None    # None: the preset's (sgd; adam for zoo-cifar10)
    lr: Optional[Rate] = None          # None: the preset's (2.5e-4; 1e-3 for zoo-cifar10)
    momentum: Optional[Fraction] = None
    nesterov: Optional[bool] = None    # None: the preset's (true for zoo-imagenet)

    def __post_init__(self):
        fill_from_preset(self, PRESETS)
        super().__post_init__()


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
