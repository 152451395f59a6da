"""Reference networks the methods need: the IT3 conditioning wrapper, a slot-attention autoencoder, an MAE decoder.

Each lives in its own file and imports only torch (the MAE decoder imports timm's transformer block when built).
"""
from .it3_conditioning import IT3Net, it3_training_loss  # noqa: F401
from .slot_attention import SlotAttention, SlotAttentionAutoEncoder  # noqa: F401
from .mae_decoder import MAEDecoder, MaskedAutoencoderViT  # noqa: F401
