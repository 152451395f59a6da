"""Pixel-space class-conditional UNet (diffusers UNet2DModel with a class-embedding table) as a judge.

The small judges the project trains (e.g. Fashion-MNIST, 28x28 or 32x32, one channel, 10 classes) are of this
kind. Soft labels enter as weights @ class-embedding table, in place of the table lookup.
Folder layout: unet/ (UNet2DModel) and scheduler/ (a DDPM or DDIM scheduler config), as DDPMPipeline saves
it, or one flat folder with the UNet's config.json, its weights and scheduler_config.json.
A judge trained on per-image standardised images says so in its tta_backend.json (`"input_norm": "per-image"`),
and then sees every image standardised the same way (tta.generative.base.normalise_judge_input).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .base import (DiffusionJudge, check_input_norm, load_component, load_scheduler, normalise_judge_input,
                   prepare_images, read_metadata, register_judge, replaced_outputs, square_size)

LAYOUT = "unet/ (UNet2DModel with num_class_embeds) + scheduler/ (scheduler_config.json), or a flat folder"


@register_judge("pixel-unet")
class PixelUNetJudge(DiffusionJudge):
    conditioning = "class"

    def __init__(self, unet: nn.Module, scheduler, class_names: Optional[Sequence[str]] = None,
                 input_norm: str = "none"):
        table = getattr(unet, "class_embedding", None)
        if not isinstance(table, nn.Embedding) or unet.config.class_embed_type is not None:
            raise ValueError("a pixel-unet judge needs a UNet2DModel with a class-embedding table "
                             "(num_class_embeds=K, class_embed_type=None); for an unconditional UNet with a map "
                             "input use kind='map-unet'")
        k = table.num_embeddings
        if class_names is not None and len(class_names) != k:
            raise ValueError(f"{len(class_names)} class names given for a judge with {k} classes")
        super().__init__(scheduler, square_size(unet.config.sample_size), unet.config.out_channels,
                         class_names or [f"class_{i}" for i in range(k)])
        self.unet = unet.eval().requires_grad_(False)
        self.input_norm = check_input_norm(input_norm)

    @classmethod
    def from_pretrained(cls, path: str, class_names: Optional[Sequence[str]] = None, torch_dtype=None,
                        input_norm: Optional[str] = None, **kwargs) -> "PixelUNetJudge":
        from diffusers import UNet2DModel
        extra = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = load_component(UNet2DModel, path, "unet", cls.kind, LAYOUT, **extra, **kwargs)
        scheduler = load_scheduler(path, cls.kind, LAYOUT)
        meta = read_metadata(path)
        return cls(unet, scheduler, class_names or meta.get("class_names"),
                   input_norm or meta.get("input_norm", "none"))

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = prepare_images(images, self.image_size, self.unet.config.in_channels)
        return normalise_judge_input(x, self.input_norm).to(self.unet.dtype)

    def condition(self, weights: torch.Tensor) -> torch.Tensor:
        self.check_weights(weights)
        table = self.unet.class_embedding.weight
        return weights.to(table.dtype) @ table

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self.unet.class_embedding.weight[labels]

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dummy = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
        with replaced_outputs([self.unet.class_embedding], lambda m: cond):
            out = self.unet(x_t, t, class_labels=dummy).sample
        return self.to_epsilon(out, x_t, t)

PixelUNetBackend = PixelUNetJudge  # deprecated alias, kept for existing code
