"""norm: test-batch normalisation statistics (Schneider et al., NeurIPS 2020; Nado et al., 2020).

Batch-norm layers normalise with the mean and variance of the test batch instead of the training statistics.
Nothing is optimised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..config import Steps
from ..params import use_batch_statistics


@dataclass
class NormConfig(AdapterConfig):
    steps: Steps = 1


@register_adapter("norm")
class Norm(Adapter):
    Config = NormConfig

    def configure_model(self):
        super().configure_model()
        use_batch_statistics(self.model)

    def collect_params(self):
        return []

    @torch.no_grad()
    def forward_and_adapt(self, x):
        return self.model(x)
