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
- "official-cifar10": the authors' CIFAR-10-C example (DequanWang/tent at e9e926a, cfgs/tent.yaml over conf.py, run
  by cifar10c.py): Adam lr 1e-3 (OPTIM.LR), betas (0.9, 0.999) (OPTIM.BETA; cifar10c.py's setup_optimizer fixes the
  second), no weight decay (OPTIM.WD), one step (OPTIM.STEPS), online (MODEL.EPISODIC false; cifar10c.py resets
  before each corruption x severity, the benchmark's reset_per_shift), batch 200 (cfgs/tent.yaml TEST.BATCH_SIZE;
  conf.py's default is 128); only batch-norm layers adapt (norms: batch, tent.py collect_params).
- "official-imagenet": the repository has no ImageNet script or config (its README: "check back soon for reference
  code to exactly reproduce the ImageNet-C results"). lr 2.5e-4 at batch 64 is the paper's ImageNet setting; the
  rest is what the repository's code builds for OPTIM.METHOD SGD (cifar10c.py setup_optimizer over conf.py):
  momentum 0.9 (OPTIM.MOMENTUM), dampening 0, Nesterov (OPTIM.NESTEROV true), no weight decay, one step, online;
  batch-norm layers only. It is also qinenergy/cotta's imagenet/cfgs/10orders/tent/tent*.yaml (SGD 0.00025, batch
  64, over a copy of that conf.py). EATA's main.py runs TENT with plain momentum instead (torch.optim.SGD(params,
  0.00025, momentum=0.9)): official-imagenet with nesterov: false.
The zoo's methods/tent.py adapts the affine parameters of BatchNorm, LayerNorm and GroupNorm layers by entropy,
as here by default (norms: all: instance norm too); batch sizes belong to the benchmark, not to the method's config.
The authors' code also puts the whole network in train mode (dropout, stochastic depth on), where this library
keeps the network in eval mode and only batch-norm layers in train mode; the tiny BN networks of the tests, and
the ResNets the presets were published with, have neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

from ..adapter import Adapter, AdapterConfig, Optimizer, register_adapter
from ..config import Fraction, Rate, fill_from_preset
from ..losses import require_class_scores, softmax_entropy
from ..params import NormKind, enable_norm_affine, use_batch_statistics


# Weight decay 0 and Adam's betas (0.9, 0.999), the zoo's WD and BETA, are every config's defaults.
_SGD = {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9}
_ADAM = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "nesterov": False}
Preset = Literal["tta", "zoo-cifar10", "zoo-imagenet", "official-cifar10", "official-imagenet"]
PRESETS: Dict[str, Dict[str, Any]] = {
    "tta": {**_SGD, "nesterov": False, "norms": "all"},
    "zoo-cifar10": {**_ADAM, "norms": "all"},                                          # zoo cifar10_c/tent.yaml
    "zoo-imagenet": {**_SGD, "nesterov": True, "norms": "all"},                        # zoo imagenet_c/tent.yaml
    "official-cifar10": {**_ADAM, "norms": "batch"},                                   # cfgs/tent.yaml, conf.py
    "official-imagenet": {**_SGD, "nesterov": True, "norms": "batch"},                 # conf.py's SGD, the paper's lr
}


@dataclass
class TentConfig(AdapterConfig):
    preset: Preset = "tta"
    optimizer: Optional[Optimizer] = None  # None: the preset's (sgd; adam for zoo-cifar10, official-cifar10)
    lr: Optional[Rate] = None          # None: the preset's (2.5e-4; 1e-3 for zoo-cifar10, official-cifar10)
    momentum: Optional[Fraction] = None
    nesterov: Optional[bool] = None    # None: the preset's (true for zoo-imagenet, official-imagenet)
    norms: Optional[NormKind] = None   # the normalisation layers adapted: all or batch (batch for official-*)

    def __post_init__(self):
        fill_from_preset(self, PRESETS)
        super().__post_init__()


@register_adapter("tent")
class Tent(Adapter):
    Config = TentConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        if not enable_norm_affine(self.model, kinds=self.cfg.norms):
            if self.cfg.norms == "batch":
                raise ValueError("tent: norms is 'batch' (batch-norm layers only, as the authors' collect_params and "
                                 "the official-* presets) and this model has none; set norms: all, or use the tta or "
                                 "zoo-* presets, to adapt its LayerNorm/GroupNorm layers")
            raise ValueError("tent adapts the affine parameters of normalisation layers, and this model has none; "
                             "use a model with BatchNorm/LayerNorm/GroupNorm or another method (e.g. memo)")

    def forward_and_adapt(self, x):
        outputs = self.model(x)
        require_class_scores(outputs, self.name)
        loss = softmax_entropy(outputs).mean()
        self.optimize(loss)
        return outputs
