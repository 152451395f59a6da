"""ttt_mae: test-time training with masked autoencoders (Gandelsman, Sun, Chen, Efros, NeurIPS 2022,
arXiv:2209.07522).

Builds on TTT (Sun et al., ICML 2020) and MAE (He et al., CVPR 2022): a ViT encoder is shared by a classification
head and an MAE decoder. For each test image on its own, the encoder is trained for a few steps to reconstruct
randomly masked patches of that image (every step draws fresh masks for a batch of copies of the image), the
decoder (but for its mask token) and head stay fixed, and the image is then classified with the adapted encoder
and the head. The source encoder is restored before the next image.
What adapts follows the authors' code (github.com/yossigandelsman/test_time_training_mae, engine_test_time.py
get_prameters_from_args, with the README's --finetune_mode 'encoder'): every parameter whose name does not start
with "decoder", so the encoder with its class token and also the decoder's mask token, which sits outside the
decoder's modules there (its classification head is in that set too but gets no gradient from the reconstruction
loss, so it stays fixed, as here). finetune_mode="encoder_no_cls_no_msk" is the authors' other mode (class and mask
tokens fixed); "encoder_no_msk" fixes only the mask token.
It is slow inference with a masked reconstruction and the encoder as the adapted set, so it reuses
`slow_inference`'s loop. Defaults: the authors' scripts, SGD lr 5e-3 (base lr 1e-2 x 128 / 256) momentum 0.9,
20 steps, 128 masked copies per step, mask ratio 0.75 (set on the model), no early stopping (random masks make
the loss too noisy to stop on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..adapter import Optimizer, register_adapter
from ..config import Fraction, Rate, Steps, Views
from ..nets.mae_decoder import MaskedAutoencoderViT
from .slow_inference import SlowInference, SlowInferenceConfig, reconstruction_loss


FinetuneMode = Literal["encoder", "encoder_no_msk", "encoder_no_cls_no_msk"]
MASK_TOKEN = "decoder.mask_token"  # MaskedAutoencoderViT keeps it in its decoder
CLS_TOKEN = "vit.cls_token"


@dataclass
class TTTMAEConfig(SlowInferenceConfig):
    steps: Steps = 20
    optimizer: Optimizer = "sgd"
    lr: Rate = 5e-3
    momentum: Fraction = 0.9
    views: Views = 128           # copies of the test image per step, each with its own random mask
    finetune_mode: FinetuneMode = "encoder"  # encoder (+ cls and mask tokens) | encoder_no_msk | encoder_no_cls_no_msk


@register_adapter("ttt_mae")
class TTTMAE(SlowInference):
    Config = TTTMAEConfig

    def __init__(self, model: nn.Module, cfg=None, **overrides):
        if not isinstance(model, MaskedAutoencoderViT):
            raise TypeError(f"ttt_mae needs a ViT with an MAE decoder, got {type(model).__name__}; build one with "
                            "tta.nets.MaskedAutoencoderViT(timm_vit) and train it with "
                            "tta.nets.mae_decoder.ttt_mae_training_loss before adapting")
        super().__init__(model, cfg, **overrides)

    def configure_model(self):
        self.model.eval()  # dropout and drop-path off: the adapted encoder should see the clean architecture
        self.model.requires_grad_(False)
        params = dict(self.model.named_parameters())
        names = list(self.model.encoder_parameter_names)
        if self.cfg.finetune_mode == "encoder":
            names.append(MASK_TOKEN)
        elif self.cfg.finetune_mode == "encoder_no_cls_no_msk":
            names = [n for n in names if n != CLS_TOKEN]
        for name in names:
            params[name].requires_grad_(True)

    def adaptation_loss(self, x: torch.Tensor) -> torch.Tensor:
        views = x.repeat_interleave(self.cfg.views, dim=0)
        return reconstruction_loss(self.model, views).mean()
