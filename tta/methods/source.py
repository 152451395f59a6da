"""source: the unadapted model, the reference every method is compared with."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import Adapter, AdapterConfig, register_adapter
from ..config import Steps


@dataclass
class SourceConfig(AdapterConfig):
    steps: Steps = 1


@register_adapter("source")
class Source(Adapter):
    Config = SourceConfig

    def collect_params(self):
        return []

    @torch.no_grad()
    def forward_and_adapt(self, x):
        return self.model(x)
