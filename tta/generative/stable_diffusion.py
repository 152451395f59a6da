"""Stable Diffusion 1.x / 2.x (Rombach et al., CVPR 2022) as a text-conditioned judge.

Classes become prompts ("a photo of a {class}.") embedded once by the CLIP text encoder; soft class weights
give the weighted sum of the prompt embeddings, as Diffusion-TTA does for Stable Diffusion and CLIP
classifiers. Latents are the VAE posterior mean times vae.config.scaling_factor. v-prediction models
(SD 2.x at 768) are converted to epsilon.
Folder or hub layout (StableDiffusionPipeline): unet/, vae/, text_encoder/, tokenizer/, scheduler/.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .base import (DiffusionJudge, load_component, load_scheduler, prepare_images, read_metadata,
                   register_judge)

LAYOUT = ("unet/ (UNet2DConditionModel) + vae/ (AutoencoderKL) + text_encoder/ (CLIPTextModel) + "
          "tokenizer/ + scheduler/")
DEFAULT_PROMPT = "a photo of a {}."


@register_judge("sd")
class StableDiffusionJudge(DiffusionJudge):
    conditioning = "text"

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 class_names: Optional[Sequence[str]] = None, prompt: str = DEFAULT_PROMPT,
                 image_size: Optional[int] = None, text_batch: int = 64):
        if "{}" not in prompt:
            raise ValueError(f"the prompt template needs a {{}} where the class name goes, got {prompt!r}")
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        size = image_size or unet.config.sample_size * self.vae_scale
        super().__init__(scheduler, (size, size), vae.config.in_channels)
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.text_batch = text_batch
        self.scaling_factor = float(vae.config.scaling_factor)
        self.register_buffer("class_embeddings", torch.empty(0), persistent=False)
        if class_names is not None:
            self.set_class_names(class_names)

    @classmethod
    def from_pretrained(cls, path: str, class_names: Optional[Sequence[str]] = None, prompt: Optional[str] = None,
                        image_size: Optional[int] = None, torch_dtype=None, **kwargs) -> "StableDiffusionJudge":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        try:
            from transformers import AutoTokenizer, CLIPTextModel
        except ImportError as e:
            raise ImportError("the sd judge needs transformers for the CLIP text encoder: "
                              "pip install transformers") from e
        meta = read_metadata(path)
        extra = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = load_component(UNet2DConditionModel, path, "unet", cls.kind, LAYOUT, **extra, **kwargs)
        vae = load_component(AutoencoderKL, path, "vae", cls.kind, LAYOUT, **extra)
        text_encoder = load_component(CLIPTextModel, path, "text_encoder", cls.kind, LAYOUT, **extra)
        tokenizer = load_component(AutoTokenizer, path, "tokenizer", cls.kind, LAYOUT)
        scheduler = load_scheduler(path, cls.kind, LAYOUT)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, class_names or meta.get("class_names"),
                   prompt or meta.get("prompt", DEFAULT_PROMPT), image_size)

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @torch.no_grad()
    def set_class_names(self, class_names: Sequence[str]) -> None:
        """Embed one prompt per class; any class list works, so CLIP's zero-shot classes can be used as they are."""
        if len(class_names) == 0:
            raise ValueError("class_names is empty")
        device = self.unet.device
        # The text encoder's positions bound the length where a tokenizer was saved without model_max_length.
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        rows = []
        for i in range(0, len(class_names), self.text_batch):
            prompts = [self.prompt.format(name) for name in class_names[i:i + self.text_batch]]
            ids = self.tokenizer(prompts, padding="max_length", max_length=length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            rows.append(self.text_encoder(ids)[0])  # last hidden state: SD's cross-attention context
        self.class_embeddings = torch.cat(rows).to(self.unet.dtype)
        self.class_names = list(class_names)

    def _require_classes(self):
        if self.class_names is None:
            raise ValueError("this sd judge has no classes yet: pass class_names= to create_judge or call "
                             "judge.set_class_names(names) (Diffusion-TTA does it from the model's class names)")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = prepare_images(images, self.image_size, self.image_channels).to(self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor

    def condition(self, weights: torch.Tensor) -> torch.Tensor:
        self._require_classes()
        self.check_weights(weights)
        return torch.einsum("bk,kld->bld", weights.to(self.class_embeddings.dtype), self.class_embeddings)

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        self._require_classes()
        return self.class_embeddings[labels]

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.unet(x_t, t, encoder_hidden_states=cond.to(x_t.dtype)).sample
        return self.to_epsilon(out, x_t, t)

StableDiffusionBackend = StableDiffusionJudge  # deprecated alias, kept for existing code
