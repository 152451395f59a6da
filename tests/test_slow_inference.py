"""Slow inference: reconstruction TTA on a slot-attention autoencoder, and the ARI / FG-ARI metrics."""
import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

import tta
import tta.methods.slow_inference  # noqa: F401  (registers "slow_inference" until the package imports it)
from tta.methods.slow_inference import ReconstructionModel, SlowInference, SlowInferenceConfig, reconstruction_loss
from tta.nets import SlotAttention, SlotAttentionAutoEncoder
from tta.segmentation_metrics import adjusted_rand_index, foreground_ari

from fixtures import tiny_model


def slot_model(seed=0):
    torch.manual_seed(seed)
    return SlotAttentionAutoEncoder(image_size=(16, 16), in_channels=1, num_slots=3, dim=16, hidden=8)


def scenes(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 16, 16)
    x[:, :, 2:7, 2:8] = torch.rand(n, 1, 1, 1, generator=g) * 0.5 + 0.5
    x[:, :, 9:14, 8:15] = torch.rand(n, 1, 1, 1, generator=g) * 0.5 + 0.5
    return x


# ---- metrics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_ari_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    k_true, k_pred = rng.integers(1, 6, size=2)
    true = torch.from_numpy(rng.integers(0, k_true, size=(3, 7, 9)))
    pred = torch.from_numpy(rng.integers(0, k_pred, size=(3, 7, 9)) * 3 + 10)  # label ids need not be 0..K-1
    ours = adjusted_rand_index(true, pred)
    ref = [adjusted_rand_score(t.flatten().numpy(), p.flatten().numpy()) for t, p in zip(true, pred)]
    assert ours.dtype == torch.float64
    assert np.allclose(ours.numpy(), ref, atol=1e-12)


def test_ari_special_cases_and_fg_ari():
    a = torch.tensor([[0, 0, 1, 1, 2, 2]])
    assert adjusted_rand_index(a, (a + 1) % 3).item() == pytest.approx(1.0)  # a permutation of the ids
    ones = torch.zeros(1, 6, dtype=torch.long)
    assert adjusted_rand_index(ones, ones).item() == adjusted_rand_score([0] * 6, [0] * 6) == 1.0
    singletons = torch.arange(6)[None]
    assert adjusted_rand_index(singletons, singletons).item() == 1.0
    assert adjusted_rand_index(ones, singletons).item() == adjusted_rand_score([0] * 6, list(range(6)))
    # FG-ARI ignores the background: merging the background into an object is not penalised.
    true = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    pred = torch.tensor([[5, 5, 5, 5, 5, 7, 7]])
    fg = foreground_ari(true, pred)
    assert fg.item() == pytest.approx(1.0)
    assert adjusted_rand_index(true, pred).item() < 1.0
    expected = adjusted_rand_score([1, 1, 2, 2], [5, 5, 7, 7])
    assert foreground_ari(true, torch.tensor([[0, 1, 2, 5, 5, 7, 7]])).item() == pytest.approx(expected)
    with pytest.raises(TypeError, match="argmax"):
        adjusted_rand_index(true, pred.float())


# ---- the slot model ----------------------------------------------------------------------------------------------
def test_slot_model_masks_partition_every_pixel():
    model = slot_model()
    x = scenes(2)
    recon, extras = model.reconstruct(x)
    assert recon.shape == x.shape and extras["masks"].shape == (2, 3, 1, 16, 16)
    assert torch.allclose(extras["masks"].sum(1), torch.ones(2, 1, 16, 16), atol=1e-5)
    assert model.predict(x).shape == (2, 3, 16, 16)
    assert isinstance(model, ReconstructionModel)
    slots, attn = SlotAttention(4, 8)(torch.randn(2, 10, 8))
    assert slots.shape == (2, 4, 8) and torch.allclose(attn.sum(-1), torch.ones(2, 10), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        model.reconstruct(torch.rand(2, 3, 16, 16))


# ---- the adapter --------------------------------------------------------------------------------------------------
def test_slow_inference_lowers_the_reconstruction_loss_of_the_scene():
    model = slot_model()
    x = scenes(1)
    with torch.no_grad():
        before = reconstruction_loss(model, x).item()
    adapter = tta.create_adapter("slow_inference", model, steps=30, lr=3e-3, episodic=False)
    adapter(x)
    with torch.no_grad():
        after = reconstruction_loss(model, x).item()
    assert after < 0.7 * before
    assert adapter.loss_history[0] == pytest.approx(before, rel=1e-5)
    assert len(adapter.loss_history) == 30
    assert set(adapter.adapted_names) == {n for n, _ in model.named_parameters()}, "all parameters adapt"


def test_reset_after_every_scene_is_bit_exact():
    model = slot_model()
    source = copy.deepcopy(model.state_dict())
    x = scenes(2)
    adapter = tta.create_adapter("slow_inference", model, steps=5, lr=3e-3)
    out = adapter(x)
    assert out.shape == (2, 3, 16, 16) and not out.requires_grad
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert not adapter.optimizer.state
    # per example: a scene's result does not depend on the scene adapted before it
    alone = adapter(x[1:])
    assert torch.equal(alone, out[1:])
    with torch.no_grad():
        adapted_differs = not torch.allclose(out, model.predict(x))
    assert adapted_differs, "the prediction must come from the adapted model"


def test_early_stopping_ends_on_a_plateau():
    model = slot_model()
    adapter = tta.create_adapter("slow_inference", model, steps=50, lr=0.0, patience=3)
    adapter(scenes(1))
    assert len(adapter.loss_history) == 4  # the first step sets the best, three more without improvement
    adapter = tta.create_adapter("slow_inference", model, steps=50, lr=3e-3, patience=3, min_delta=10.0)
    adapter(scenes(1))
    assert len(adapter.loss_history) == 4
    with pytest.raises(ValueError, match="patience"):
        tta.create_adapter("slow_inference", model, patience=-1)


class RecordingSlowInference(SlowInference):
    """Keeps a copy of the adapted parameters before every update, to check which ones restore_best loads."""

    def forward_and_adapt(self, x):
        self.before.append([p.detach().clone() for _, p in self.adapted_params])
        return super().forward_and_adapt(x)

    def adapt_and_predict(self, x):
        self.before = []
        return super().adapt_and_predict(x)


def test_restore_best_loads_the_weights_of_the_lowest_loss():
    x = scenes(1)
    # lr 3e-2 is far too large for Adam here: the loss drops, spikes, reaches its lowest at step 4, then climbs.
    plain = tta.create_adapter("slow_inference", slot_model(), steps=6, lr=3e-2, episodic=False)
    plain_out = plain(x)
    model = slot_model()
    adapter = RecordingSlowInference(model, steps=6, lr=3e-2, episodic=False, restore_best=True)
    out = adapter(x)
    history = adapter.loss_history
    assert history == plain.loss_history, "restore_best must not change the trajectory"
    losses = history + [adapter.final_loss]
    assert adapter.best_step == int(np.argmin(losses))
    assert 0 < adapter.best_step < len(history) and losses[-1] > min(losses), "the case needs the loss to rise"
    # The weights loaded are those *before* the update at best_step (whose loss loss_history[best_step] is).
    assert all(torch.equal(p, b) for (_, p), b in zip(adapter.adapted_params, adapter.before[adapter.best_step]))
    with torch.no_grad():
        assert reconstruction_loss(model, x).item() == pytest.approx(history[adapter.best_step], rel=1e-6)
        assert torch.equal(out, model.predict(x))
    assert not torch.allclose(out, plain_out), "the last weights predict differently"


def test_restore_best_keeps_the_last_weights_when_they_are_best():
    x = scenes(1)
    plain_model, model = slot_model(), slot_model()
    plain = tta.create_adapter("slow_inference", plain_model, steps=1, lr=3e-3, episodic=False)
    adapter = tta.create_adapter("slow_inference", model, steps=1, lr=3e-3, episodic=False, restore_best=True)
    assert torch.equal(adapter(x), plain(x))
    # One step lowers the loss, so the weights after it (never in loss_history) must win over the source's.
    assert adapter.best_step == 1 and adapter.final_loss < adapter.loss_history[0]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))
    # With the loss flat (lr 0), the earliest of equal losses wins: the source weights.
    adapter = tta.create_adapter("slow_inference", slot_model(), steps=3, lr=0.0, episodic=False, restore_best=True)
    adapter(x)
    assert adapter.best_step == 0


def test_restore_best_reset_is_bit_exact():
    model = slot_model()
    source = copy.deepcopy(model.state_dict())
    x = scenes(2)
    adapter = tta.create_adapter("slow_inference", model, steps=4, lr=3e-2, restore_best=True)
    out = adapter(x)
    assert adapter.best_step < len(adapter.loss_history), "the case must load a snapshot before the reset"
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert not adapter.optimizer.state
    assert set(adapter.state_dict()) == {"model." + k for k in source}, "the snapshot is no module state"
    assert torch.equal(adapter(x[1:]), out[1:]), "a scene's result does not depend on the scene before it"


def test_restore_best_config():
    assert SlowInferenceConfig().restore_best is False, "off by default: existing configs keep their meaning"
    assert tta.create_adapter("slow_inference", slot_model(), restore_best=True).cfg.restore_best is True
    with pytest.raises(ValueError, match="restore_best"):
        tta.create_adapter("slow_inference", slot_model(), restore_best="true")
    with pytest.raises(ValueError, match="restore_best"):
        SlowInferenceConfig(restore_best=1)


def test_generic_model_with_the_default_loss():
    class Autoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)

        def reconstruct(self, x):
            return self.dec(torch.relu(self.enc(x))), {}

        def predict(self, x):
            return self.enc(x).mean((2, 3))

    torch.manual_seed(0)
    model = Autoencoder()
    x = scenes(1)
    before = reconstruction_loss(model, x).item()
    adapter = tta.create_adapter("slow_inference", model, steps=20, lr=1e-2, episodic=False, per_example=False)
    assert adapter(x).shape == (1, 4)
    assert reconstruction_loss(model, x).item() < before


def test_refuses_models_that_do_not_reconstruct():
    with pytest.raises(TypeError, match="reconstruct"):
        tta.create_adapter("slow_inference", tiny_model())
