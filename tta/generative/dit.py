"""DiT (Peebles & Xie, ICCV 2023) class-conditional latent diffusion as a judge: DiT-XL/2 at 256 or 512.

Soft labels enter through the label-embedding tables: diffusers' DiT keeps one table per transformer block
(copies of the original single table), and each lookup is replaced by weights @ table for the duration of
one forward pass. Latents are the VAE posterior mean times vae.config.scaling_factor (0.18215).
Folder or hub layout (DiTPipeline): transformer/, vae/, scheduler/, and model_index.json, whose id2label
names the classes; without it 1,000-class judges take the ImageNet names.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch
from torch import nn

from .base import (DiffusionJudge, is_local, labels_with_outputs, load_component, load_scheduler, prepare_images,
                   read_metadata, register_judge)

LAYOUT = "transformer/ (DiTTransformer2DModel) + vae/ (AutoencoderKL) + scheduler/ [+ model_index.json]"


def _id2label_names(path: str, num_classes: int) -> Optional[List[str]]:
    """Class names from the pipeline's model_index.json id2label (first synonym of each), if it has them."""
    try:
        if is_local(path):
            file = os.path.join(os.path.expanduser(path), "model_index.json")
            if not os.path.isfile(file):
                return None
            with open(file) as f:
                index = json.load(f)
        else:
            from diffusers import DiffusionPipeline
            index = DiffusionPipeline.load_config(path)
    except (OSError, ValueError):
        return None
    id2label = index.get("id2label")
    if not id2label or len(id2label) != num_classes:
        return None
    return [id2label[str(i)].split(",")[0].strip() if str(i) in id2label else id2label[i].split(",")[0].strip()
            for i in range(num_classes)]


@register_judge("dit")
class DiTJudge(DiffusionJudge):
    conditioning = "class"

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler, class_names: Optional[Sequence[str]] = None):
        k = transformer.config.num_embeds_ada_norm
        if not k:
            raise ValueError("a dit judge needs a class-conditional DiT (num_embeds_ada_norm = number of classes)")
        if class_names is not None and len(class_names) != k:
            raise ValueError(f"{len(class_names)} class names given for a DiT with {k} classes")
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        size = transformer.config.sample_size * self.vae_scale
        names = class_names or [f"class_{i}" for i in range(k)]
        super().__init__(scheduler, (size, size), vae.config.in_channels, names)
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)

    @classmethod
    def from_pretrained(cls, path: str, class_names: Optional[Sequence[str]] = None, torch_dtype=None,
                        **kwargs) -> "DiTJudge":
        from diffusers import AutoencoderKL, DiTTransformer2DModel
        extra = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        transformer = load_component(DiTTransformer2DModel, path, "transformer", cls.kind, LAYOUT, **extra, **kwargs)
        vae = load_component(AutoencoderKL, path, "vae", cls.kind, LAYOUT, **extra)
        scheduler = load_scheduler(path, cls.kind, LAYOUT)
        k = transformer.config.num_embeds_ada_norm
        names = class_names or read_metadata(path).get("class_names") or _id2label_names(path, k)
        if names is None and k == 1000:
            from ..models.sources import imagenet_class_names
            names = imagenet_class_names()
        return cls(transformer, vae, scheduler, names)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def label_tables(self) -> List[nn.Module]:
        from diffusers.models.embeddings import LabelEmbedding
        return [m for m in self.transformer.modules() if isinstance(m, LabelEmbedding)]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = prepare_images(images, self.image_size, self.image_channels).to(self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor

    def condition(self, weights: torch.Tensor) -> torch.Tensor:
        # The native condition is the weights themselves; each block's table turns them into its embedding.
        self.check_weights(weights)
        return weights

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        def soft_embedding(table):
            weight = table.embedding_table.weight[:table.num_classes]  # the last row is the null class of CFG
            return cond.to(weight.dtype) @ weight
        dummy = labels_with_outputs(self.label_tables(), torch.zeros(x_t.shape[0], dtype=torch.long,
                                                                     device=x_t.device), soft_embedding)
        out = self.transformer(x_t, timestep=t, class_labels=dummy).sample
        if out.shape[1] == 2 * x_t.shape[1]:  # learned variance: the first half is the noise prediction
            out = out[:, :x_t.shape[1]]
        return self.to_epsilon(out, x_t, t)

DiTBackend = DiTJudge  # deprecated alias, kept for existing code
