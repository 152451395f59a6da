"""TENT against an independent re-implementation of the published algorithm (Wang et al., 2021, Alg. 1 and
the authors' tent.py): BN in train mode without running statistics, only norm affine parameters trainable,
loss = mean softmax entropy, one optimizer step per forward, outputs returned from before the update."""
import copy

import pytest
import torch
from torch import nn

import tta

from fixtures import tiny_model
from official_code import tent_forward_and_adapt


def reference_tent(model, lr, steps_per_batch, batches, optimizer="sgd"):
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    outs = []
    for x in batches:
        for _ in range(steps_per_batch):
            logits = tent_forward_and_adapt(x, model, opt)  # the authors' step: official_code.py
        outs.append(logits.detach())
    return outs


@pytest.mark.parametrize("optimizer, lr, steps", [("sgd", 0.01, 1), ("sgd", 0.02, 3), ("adam", 1e-3, 2)])
def test_tent_matches_the_reference(optimizer, lr, steps):
    torch.manual_seed(3)
    batches = [torch.rand(6, 3, 16, 16) for _ in range(4)]
    model = tiny_model(sharpness=5.0)
    ref_model = copy.deepcopy(model)
    adapter = tta.create_adapter("tent", model, lr=lr, steps=steps, optimizer=optimizer)
    outs = [adapter(x) for x in batches]
    ref_outs = reference_tent(ref_model, lr, steps, batches, optimizer)
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    ref_params = dict(ref_model.named_parameters())
    moved = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-6)
        moved += int(not torch.equal(p, dict(tiny_model(sharpness=5.0).named_parameters())[name]))
    assert moved > 0, "the comparison must cover parameters that actually changed"
