"""A slot-attention autoencoder (Locatello et al., "Object-Centric Learning with Slot Attention", NeurIPS 2020,
arXiv:2006.15055), small enough to train on a CPU, as the reference slot-centric model for slow inference
(Slot-TTA, Prabhudesai et al., ICML 2023, arXiv:2203.11194).

CNN encoder with a soft position embedding -> slot attention (iterative attention in which slots compete for
pixels, GRU updates) -> spatial broadcast decoder (Watters et al., 2019) that renders each slot to an image and
an alpha mask; masks are a softmax over slots and the reconstruction is the mask-weighted sum. The segmentation
is read from the masks: pixel -> argmax over slots.

Slots start from learned per-slot queries rather than Gaussian samples: the reconstruction loss is then a
deterministic function of the weights, which test-time gradient descent and early stopping need.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def position_grid(height: int, width: int) -> torch.Tensor:
    """(1, 4, H, W): distances to the four image borders, in [0, 1] (the Slot Attention position features)."""
    ys = torch.linspace(0.0, 1.0, height)
    xs = torch.linspace(0.0, 1.0, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gy, gx, 1 - gy, 1 - gx])[None]


class SoftPositionEmbed(nn.Module):
    """Adds a learned linear projection of the position grid to a (B, C, H, W) feature map."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(4, channels, 1)
        self.register_buffer("grid", position_grid(height, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.grid)


class SlotAttention(nn.Module):
    """Slot attention: `num_slots` slots attend over N inputs for `iters` rounds; softmax over the slots."""

    def __init__(self, num_slots: int, dim: int, iters: int = 3, hidden: int = 128, eps: float = 1e-8):
        super().__init__()
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        self.slots_init = nn.Parameter(torch.randn(1, num_slots, dim) * dim ** -0.5)
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, N, D) -> slots (B, S, D), attention (B, N, S) of the last iteration."""
        b, _, d = inputs.shape
        inputs = self.norm_inputs(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)
        slots = self.slots_init.expand(b, -1, -1)
        attn = None
        for _ in range(self.iters):
            prev = slots
            q = self.to_q(self.norm_slots(slots)) * d ** -0.5
            attn = torch.einsum("bnd,bsd->bns", k, q).softmax(-1) + self.eps  # slots compete for each input
            weights = attn / attn.sum(1, keepdim=True)                       # weighted mean over the inputs
            updates = torch.einsum("bns,bnd->bsd", weights, v)
            slots = self.gru(updates.reshape(-1, d), prev.reshape(-1, d)).reshape(b, -1, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class SlotAttentionAutoEncoder(nn.Module):
    """Unsupervised object discovery on (B, C, H, W) images in [0, 1] (H and W divisible by 4).

    Implements the reconstruction protocol of `tta.methods.slow_inference`: `reconstruct(x)` returns the
    reconstruction and {"masks": (B, S, 1, H, W), "slots": (B, S, D)}; `predict(x)` returns the per-slot masks
    (B, S, H, W), whose argmax over dim 1 is the segmentation.
    """

    def __init__(self, image_size: Tuple[int, int] = (24, 24), in_channels: int = 1, num_slots: int = 3,
                 dim: int = 32, iters: int = 3, hidden: int = 16):
        super().__init__()
        h, w = image_size
        if h % 4 or w % 4:
            raise ValueError(f"image_size must be divisible by 4 (the decoder upsamples 4x), got {image_size}")
        self.image_size, self.in_channels, self.num_slots = (h, w), in_channels, num_slots
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 5, padding=2), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 5, padding=2), nn.ReLU(),
            nn.Conv2d(hidden, dim, 5, padding=2), nn.ReLU())
        self.encoder_pos = SoftPositionEmbed(dim, h, w)
        self.encoder_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.slot_attention = SlotAttention(num_slots, dim, iters)
        # Broadcast at a quarter of the resolution and upsample: four times fewer pixels in the costly layers.
        self.decoder_size = (h // 4, w // 4)
        self.decoder_pos = SoftPositionEmbed(dim, *self.decoder_size)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(dim, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, in_channels + 1, 3, padding=1))

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder_pos(self.encoder(x * 2 - 1))
        tokens = self.encoder_mlp(feats.flatten(2).transpose(1, 2))
        return self.slot_attention(tokens)

    def decode(self, slots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, s, d = slots.shape
        grid = slots.reshape(b * s, d, 1, 1).expand(-1, -1, *self.decoder_size)
        out = self.decoder(self.decoder_pos(grid)).reshape(b, s, self.in_channels + 1, *self.image_size)
        rgb, alpha = out[:, :, :-1], out[:, :, -1:]
        masks = alpha.softmax(1)  # slots compete for every pixel
        return (masks * rgb).sum(1), masks

    def reconstruct(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels,) + self.image_size:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(x.shape)}")
        slots, _ = self.encode(x)
        recon, masks = self.decode(slots)
        return recon, {"masks": masks, "slots": slots}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)[1]["masks"][:, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)

    def reconstruction_loss(self, x: torch.Tensor, reconstruction: torch.Tensor,
                            extras: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example mean squared error (B,), the training and test-time objective."""
        return F.mse_loss(reconstruction, x, reduction="none").flatten(1).mean(1)
