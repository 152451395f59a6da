"""The project's Diffusion-TTA step (condition-gradient accumulation, one classifier pass) and the naive reference
loop that benchmarks/perf/run.py times it against (fixtures.py: classifier re-run and image re-encoded per
micro-batch) give the same loss and the same gradients on the same (t, eps) draws, and the same adapted weights
after optimizer steps."""
import copy

import pytest
import torch
from torch import nn

import tta
from fixtures import NAIVE_SETTING, naive_diffusion_tta, naive_diffusion_tta_step, save_pixel_judge

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return save_pixel_judge(tmp_path_factory.mktemp("judge") / "judge", num_classes=5, size=16, channels=3)


def tiny_classifier(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, num_classes))


@pytest.mark.parametrize("batch,pairs,micro_batch", [(1, 30, 15), (2, 23, 7)])
def test_same_loss_and_gradients(judge, batch, pairs, micro_batch):
    model = tiny_classifier()
    source = copy.deepcopy(model)
    x = torch.rand(batch, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    adapter = tta.create_adapter("diffusion_tta", model, judge=judge, seed=0, pairs=pairs, micro_batch=micro_batch,
                                 **NAIVE_SETTING)
    with torch.enable_grad():
        adapter.compute_gradients(x)
    project = {n: p.grad.clone() for n, p in adapter.model.named_parameters()}

    naive_model = copy.deepcopy(source).requires_grad_(True)
    loss = naive_diffusion_tta_step(naive_model, adapter.judge, x, None, pairs, micro_batch,
                                         torch.Generator().manual_seed(0), step=False)
    assert loss == pytest.approx(adapter.last_loss, rel=1e-6, abs=1e-8)
    for n, p in naive_model.named_parameters():
        assert torch.allclose(p.grad, project[n], rtol=1e-4, atol=1e-8), n
    assert any(g.abs().sum() > 0 for g in project.values())


def test_same_adaptation_over_steps(judge):
    model = tiny_classifier()
    source = copy.deepcopy(model)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    adapter = tta.create_adapter("diffusion_tta", model, judge=judge, seed=0, steps=2, pairs=14, micro_batch=6,
                                 episodic=False, lr=0.05, **NAIVE_SETTING)
    losses = []
    step = adapter.forward_and_adapt

    def logged(xb):
        out = step(xb)
        losses.append(adapter.last_loss)
        return out
    adapter.forward_and_adapt = logged
    project_out = adapter(x)

    naive_losses = []
    naive_out = naive_diffusion_tta(source, adapter.judge, x, steps=2, pairs=14, micro_batch=6, lr=0.05,
                                         generator=torch.Generator().manual_seed(0), losses=naive_losses)
    assert naive_losses == pytest.approx(losses, rel=1e-5)
    assert torch.allclose(naive_out, project_out, rtol=1e-4, atol=1e-6)
