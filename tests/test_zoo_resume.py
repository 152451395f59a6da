"""Judge training resumes exactly: an interrupted run continued with resume=True ends with the weights of the
uninterrupted run, and a state written by another recipe is refused."""
import pytest
import torch

from tta.zoo.ddpm import train_ddpm, training_state_path


class Crash(RuntimeError):
    pass


def tiny_unet():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       num_class_embeds=3)


def run(state, steps=6, crash_after=None, resume=False, seed=0):
    torch.manual_seed(123)
    x = torch.rand(40, 1, 8, 8) * 2 - 1
    y = torch.arange(40) % 3
    calls = {"n": 0}
    saved = {}

    def batch(idx):
        calls["n"] += 1
        if crash_after is not None and calls["n"] > crash_after:
            raise Crash("killed")
        return x[idx], y[idx]

    def save(ema, scheduler, info):
        saved["ema"] = {k: v.clone() for k, v in ema.state_dict().items()}
        saved["info"] = info

    train_ddpm(tiny_unet, len(x), batch, lambda u, x_t, t, c: u(x_t, t, class_labels=c).sample, save, steps, 8,
               seed, save_every=2, state_path=state, resume=resume)
    return saved


def test_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = run(tmp_path / "a.train-state.pt")
    state = tmp_path / "b.train-state.pt"
    with pytest.raises(Crash):
        run(state, crash_after=3)            # dies during step 4; the state of step 2 is on disk
    assert torch.load(state, weights_only=True)["step"] == 2
    resumed = run(state, resume=True)
    assert resumed["info"]["steps_done"] == 6
    for k, v in whole["ema"].items():
        assert torch.equal(v, resumed["ema"][k]), k


def test_resume_refuses_another_recipe_and_a_broken_state(tmp_path):
    state = tmp_path / "s.train-state.pt"
    run(state, steps=2)
    with pytest.raises(ValueError, match="another recipe"):
        run(state, steps=4, resume=True, seed=1)
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="delete it"):
        run(state, resume=True)


def test_training_state_lives_beside_the_judge_folder(tmp_path):
    assert training_state_path(tmp_path / "judge") == tmp_path / "judge.train-state.pt"


def test_ema_follows_diffusers_ema_model():
    """The recipe's EMA (ema_update) is diffusers' EMAModel(decay=0.999, update_after_step=-1): the same decay
    warm-up, step for step, to float rounding (the two write the update in different orders)."""
    from diffusers.training_utils import EMAModel

    from tta.zoo.ddpm import ema_update
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    ema.load_state_dict(model.state_dict())
    reference = EMAModel(model.parameters(), decay=0.999, update_after_step=-1)
    for step in range(1, 41):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema_update(ema, model, step)
        reference.step(model.parameters())
        assert reference.cur_decay_value == min(0.999, (1 + step) / (10 + step))
    for mine, theirs in zip(ema.parameters(), reference.shadow_params):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # a different schedule would be told apart: diffusers' default (update_after_step=0) lags one step
    lagged = EMAModel(model.parameters(), decay=0.999)
    lagged.step(model.parameters())
    assert lagged.cur_decay_value != min(0.999, 2 / 11)
