"""A masked-autoencoder decoder for a timm VisionTransformer (He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022, arXiv:2111.06377), and the Y-shaped model TTT-MAE adapts (Gandelsman et al., NeurIPS 2022).

`MaskedAutoencoderViT` shares one ViT encoder between the classification head (the ViT's own head) and a small
transformer decoder that reconstructs randomly masked patches from the visible ones. It follows the
reconstruction protocol of `tta.methods.slow_inference`: `reconstruct(x)` returns predicted patches and the
mask, `reconstruction_loss` scores the masked patches only, `predict(x)` classifies the whole image.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.wrapper import check_images

VIT_PARTS = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "num_prefix_tokens")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in row-major order like the ViT's patch embedding."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """MAE's per-example random masking: (indices of kept patches (B, V), mask (B, N) with 1 = masked)."""
    keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    order = torch.rand(batch, num_patches, device=device).argsort(1)
    kept = order[:, :keep].sort(1).values
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, kept, 0.0)
    return kept, mask


class MAEDecoder(nn.Module):
    """Embeds the visible tokens, fills in a learned mask token, adds positions, runs a few transformer blocks and
    predicts the pixels of every patch."""

    def __init__(self, embed_dim: int, num_patches: int, num_prefix_tokens: int, patch_pixels: int,
                 dim: int = 64, depth: int = 1, num_heads: int = 2):
        super().__init__()
        from timm.models.vision_transformer import Block
        self.num_patches, self.num_prefix_tokens = num_patches, num_prefix_tokens
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_prefix_tokens + num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """latent (B, P + V, D) from the encoder, kept (B, V) patch indices -> predicted patches (B, N, pixels)."""
        b, p = latent.shape[0], self.num_prefix_tokens
        x = self.embed(latent)
        full = self.mask_token.expand(b, self.num_patches, -1).clone()
        full.scatter_(1, kept[..., None].expand(-1, -1, x.shape[-1]), x[:, p:])
        x = torch.cat([x[:, :p], full], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, p:])


class MaskedAutoencoderViT(nn.Module):
    """A timm VisionTransformer classifier plus an MAE decoder on its encoder; takes images in [0, 1].

    Args:
        vit: a timm VisionTransformer (with its classification head); e.g.
            timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, ...).
        mean, std: per-channel input normalisation applied before the ViT.
        mask_ratio: fraction of patches hidden from the encoder (MAE and TTT-MAE: 0.75).
        norm_pix_loss: reconstruct each patch normalised by its own mean and variance (MAE's best setting, used
            by TTT-MAE's released scripts).
    """

    def __init__(self, vit: nn.Module, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True, decoder_dim: int = 64,
                 decoder_depth: int = 1, decoder_heads: int = 2):
        super().__init__()
        missing = [a for a in VIT_PARTS if not hasattr(vit, a)]
        if missing:
            raise TypeError(f"MaskedAutoencoderViT needs a timm VisionTransformer (missing {missing}); build one "
                            "with timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=..., ...)")
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size ViTs keep tokens as a 2D grid; create the ViT with "
                             "dynamic_img_size=False")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.vit = vit
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = int(vit.patch_embed.patch_size[0])
        self.in_chans = int(vit.patch_embed.proj.in_channels)
        self.image_size = tuple(int(s) for s in vit.patch_embed.img_size)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per input channel)")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        num_patches = int(vit.patch_embed.num_patches)
        self.decoder = MAEDecoder(vit.embed_dim, num_patches, int(vit.num_prefix_tokens),
                                  self.patch * self.patch * self.in_chans, decoder_dim, decoder_depth, decoder_heads)

    @property
    def encoder_parameter_names(self) -> list:
        """The parameters TTT-MAE adapts: the ViT without its classification head."""
        head = {id(p) for p in self.vit.get_classifier().parameters()}
        return [f"vit.{n}" for n, p in self.vit.named_parameters() if id(p) not in head]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def encode_visible(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Run the ViT encoder on the kept patches only (plus its class/register tokens)."""
        vit = self.vit
        tokens = vit._pos_embed(vit.patch_embed(x))
        p = int(vit.num_prefix_tokens)
        visible = tokens[:, p:].gather(1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
        return vit.norm(vit.blocks(vit.norm_pre(torch.cat([tokens[:, :p], visible], 1))))

    def reconstruct(self, x: torch.Tensor, mask_ratio: Optional[float] = None
                    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Hide a random `mask_ratio` of the patches of each image and predict them: (patches (B, N, pixels),
        {"mask": (B, N), 1 = hidden, "target": the patches to match})."""
        xn = self.normalize(x)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        kept, mask = random_masking(x.shape[0], self.decoder.num_patches, ratio, x.device)
        pred = self.decoder(self.encode_visible(xn, kept), kept)
        target = patchify(xn, self.patch)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return pred, {"mask": mask, "target": target}

    def reconstruction_loss(self, x: torch.Tensor, reconstruction: torch.Tensor,
                            extras: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example MSE over the hidden patches (B,); visible patches are not scored, as in MAE."""
        per_patch = ((reconstruction - extras["target"]) ** 2).mean(-1)
        mask = extras["mask"]
        return (per_patch * mask).sum(1) / mask.sum(1).clamp(min=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)


def ttt_mae_training_loss(model: MaskedAutoencoderViT, x: torch.Tensor, labels: torch.Tensor,
                          reconstruction_weight: float = 1.0) -> torch.Tensor:
    """Joint training of encoder, head and decoder (TTT's Y-shaped recipe): CE(head) + w * masked MSE."""
    recon, extras = model.reconstruct(x)
    return F.cross_entropy(model.predict(x), labels) + reconstruction_weight * model.reconstruction_loss(
        x, recon, extras).mean()
