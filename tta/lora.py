"""LoRA (Hu et al., ICLR 2022, arXiv:2106.09685): low-rank updates of attention q/v projections, applied through
torch.func.functional_call so the model itself is never modified (its state dict stays the source's, and reset only
has to restore these updates)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn


class LoRA(nn.Module):
    """delta = B @ A * alpha / rank on row blocks of one weight matrix (B starts at zero: delta starts at 0)."""

    def __init__(self, weight: torch.Tensor, row_blocks: List[Tuple[int, int]], rank: int, alpha: float):
        super().__init__()
        self.row_blocks = row_blocks
        self.scale = alpha / rank
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for r0, r1 in row_blocks:
            a = torch.empty(rank, weight.shape[1], dtype=weight.dtype, device=weight.device)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # as peft and the LoRA paper's code
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(r1 - r0, rank, dtype=weight.dtype, device=weight.device)))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        pieces, row = [], 0
        for (r0, r1), a, b in zip(self.row_blocks, self.A, self.B):
            if r0 > row:
                pieces.append(weight.new_zeros(r0 - row, weight.shape[1]))
            pieces.append(b @ a * self.scale)
            row = r1
        if row < weight.shape[0]:
            pieces.append(weight.new_zeros(weight.shape[0] - row, weight.shape[1]))
        return torch.cat(pieces)


def lora_targets(model: nn.Module) -> Dict[str, List[Tuple[int, int]]]:
    """Attention query and value projections: packed (nn.MultiheadAttention, timm's qkv) or separate layers."""
    targets: Dict[str, List[Tuple[int, int]]] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):
            e = m.embed_dim
            if m.in_proj_weight is not None:
                targets[prefix + "in_proj_weight"] = [(0, e), (2 * e, 3 * e)]
            else:
                targets[prefix + "q_proj_weight"] = [(0, m.q_proj_weight.shape[0])]
                targets[prefix + "v_proj_weight"] = [(0, m.v_proj_weight.shape[0])]
        elif isinstance(m, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "qkv" and m.out_features % 3 == 0:
                e = m.out_features // 3
                targets[prefix + "weight"] = [(0, e), (2 * e, 3 * e)]
            elif leaf in ("q", "v", "q_proj", "v_proj", "query", "value", "to_q", "to_v"):
                targets[prefix + "weight"] = [(0, m.out_features)]
    return targets


class LoRASet(nn.Module):
    """LoRA updates for a model, applied through torch.func.functional_call: the model itself is never modified,
    so its state dict stays the source's and reset only has to zero these parameters' updates."""

    def __init__(self, model: nn.Module, rank: int, alpha: float):
        super().__init__()
        targets = lora_targets(model)
        if not targets:
            raise ValueError("adapt='lora' adapts attention q/v projections and this model has none; "
                             "use adapt='all', 'norm' or 'last'")
        params = dict(model.named_parameters())
        self.names = sorted(targets)
        self.updates = nn.ModuleList(LoRA(params[n], targets[n], rank, alpha) for n in self.names)

    def forward(self, model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        params = dict(model.named_parameters())
        merged = {n: params[n] + lora.delta(params[n]) for n, lora in zip(self.names, self.updates)}
        return torch.func.functional_call(model, merged, (x,), kwargs)
