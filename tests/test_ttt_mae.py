"""TTT-MAE: masked reconstruction on a tiny timm ViT, encoder-only per-example adaptation."""
import copy

import pytest
import torch

import tta
import tta.methods.ttt_mae  # noqa: F401  (registers "ttt_mae" until the package imports it)
from tta.methods.slow_inference import reconstruction_loss
from tta.nets import MaskedAutoencoderViT
from tta.nets.mae_decoder import patchify, random_masking, ttt_mae_training_loss

from fixtures import tiny_model

timm = pytest.importorskip("timm")


def mae_model(seed=0, norm_pix_loss=True):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            embed_dim=32, num_heads=2, in_chans=1, num_classes=3)
    return MaskedAutoencoderViT(vit, decoder_dim=16, norm_pix_loss=norm_pix_loss)


@pytest.fixture
def grey():
    torch.manual_seed(1)
    return torch.rand(3, 1, 16, 16)


def test_patchify_and_masking():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 4)
    assert torch.equal(p[0, 1], torch.tensor([2.0, 3.0, 6.0, 7.0]))  # top-right patch, row-major
    kept, mask = random_masking(5, 16, 0.75, torch.device("cpu"))
    assert kept.shape == (5, 4) and torch.equal(mask.sum(1), torch.full((5,), 12.0))
    assert torch.equal(mask.gather(1, kept), torch.zeros(5, 4))


def test_reconstruction_scores_only_hidden_patches(grey):
    model = mae_model(norm_pix_loss=False)
    recon, extras = model.reconstruct(grey)
    assert recon.shape == (3, 16, 16) and extras["mask"].shape == (3, 16)
    loss = model.reconstruction_loss(grey, recon, extras)
    cheat = torch.where(extras["mask"][..., None].bool(), extras["target"], recon)  # hidden patches perfect
    assert torch.allclose(model.reconstruction_loss(grey, cheat, extras), torch.zeros(3))
    assert (loss > 0).all()
    assert model.predict(grey).shape == (3, 3)


def test_encoder_is_all_of_the_vit_but_its_head():
    model = mae_model()
    names = set(model.encoder_parameter_names)
    assert "vit.head.weight" not in names and "vit.pos_embed" in names and "vit.blocks.0.attn.qkv.weight" in names
    assert not any(n.startswith("decoder") for n in names)


def test_adaptation_moves_only_the_encoder_and_mask_token_and_lowers_the_loss(grey):
    model = mae_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = tta.create_adapter("ttt_mae", model, steps=10, views=16, lr=0.05, episodic=False)
    adapted = set(model.encoder_parameter_names) | {"decoder.mask_token"}  # the authors' finetune_mode 'encoder'
    assert set(adapter.adapted_names) == adapted
    torch.manual_seed(0)
    with torch.no_grad():
        loss_before = reconstruction_loss(model, grey[:1].repeat(64, 1, 1, 1)).mean()
    out = adapter(grey[:1])
    torch.manual_seed(0)
    with torch.no_grad():
        loss_after = reconstruction_loss(model, grey[:1].repeat(64, 1, 1, 1)).mean()
    assert out.shape == (1, 3)
    assert loss_after < loss_before
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= adapted
    with torch.no_grad():
        assert torch.equal(out, model.predict(grey[:1])), "the head classifies with the adapted encoder"


def test_per_example_reset_is_bit_exact(grey):
    model = mae_model()
    source = copy.deepcopy(model.state_dict())
    adapter = tta.create_adapter("ttt_mae", model, steps=2, views=4)
    torch.manual_seed(0)
    out = adapter(grey)
    assert out.shape == (3, 3) and not out.requires_grad
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert not adapter.optimizer.state
    with torch.no_grad():
        source_pred = model.predict(grey)
    assert not torch.allclose(out, source_pred)


def test_joint_training_loss_trains_head_encoder_and_decoder(grey):
    model = mae_model()
    loss = ttt_mae_training_loss(model, grey, torch.tensor([0, 1, 2]))
    loss.backward()
    assert model.vit.head.weight.grad is not None
    assert model.decoder.pred.weight.grad is not None
    assert model.vit.blocks[0].attn.qkv.weight.grad is not None


def test_clear_errors(grey):
    with pytest.raises(TypeError, match="MaskedAutoencoderViT"):
        tta.create_adapter("ttt_mae", tiny_model())
    with pytest.raises(TypeError, match="VisionTransformer"):
        MaskedAutoencoderViT(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mae_model().predict(grey * 255)
