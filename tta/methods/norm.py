"""norm: test-batch normalisation statistics (Schneider et al., NeurIPS 2020; Nado et al., 2020).

Batch-norm layers normalise with the mean and variance of the test batch instead of the training statistics.
Nothing is optimised.

Presets (`preset`; a field given explicitly wins): "tta" (the default) keeps each layer's own epsilon; "official"
sets every batch-norm epsilon to 1e-5, as the TENT authors' norm.py (DequanWang/tent, and qinenergy/cotta's copy)
does through Norm(model, eps=1e-5): it changes the outputs of networks built with another epsilon (timm's
TensorFlow ports use 1e-3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Dict, Literal, Optional

import torch
from annotated_types import Interval, doc
from torch import nn

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..config import Steps, fill_from_preset
from ..params import use_batch_statistics

Preset = Literal["tta", "official"]
PRESETS: Dict[str, Dict[str, Any]] = {"tta": {"bn_eps": -1.0}, "official": {"bn_eps": 1e-5}}


@dataclass
class NormConfig(AdapterConfig):
    preset: Preset = "tta"
    steps: Steps = 1
    # epsilon of every batch-norm layer; -1: each layer's own (None: the preset's)
    bn_eps: Optional[Annotated[float, Interval(ge=-1, le=1), doc("-1: each layer's own")]] = None

    def __post_init__(self):
        fill_from_preset(self, PRESETS)
        super().__post_init__()
        self.bn_eps = float(self.bn_eps)


@register_adapter("norm")
class Norm(Adapter):
    Config = NormConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)
        if self.cfg.bn_eps >= 0:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eps = self.cfg.bn_eps

    def collect_params(self):
        return []

    @torch.no_grad()
    def forward_and_adapt(self, x):
        return self.model(x)
