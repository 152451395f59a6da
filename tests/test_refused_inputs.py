"""A refused input never changes the model: refusals that only show once the network runs (an image size it
cannot take, outputs that are not class scores) come after batch-norm layers in training mode have counted the batch,
and those counters and statistics are put back; cotta refuses images too small for its augmentations up front."""
import copy

import pytest
import torch

import tta

from fixtures import FAST, methods, tiny_model


def snapshot(adapter):
    optimizer = copy.deepcopy(adapter.optimizer.state_dict()) if adapter.optimizer is not None else None
    return {k: v.clone() for k, v in adapter.state_dict().items()}, repr(optimizer), dict(adapter.guard_events)


def unchanged(adapter, before):
    state, optimizer, events = snapshot(adapter)
    changed = [k for k, v in state.items() if not torch.equal(v, before[0][k])]
    assert not changed, f"a refused input changed {changed}"
    assert optimizer == before[1] and events == before[2]


@pytest.mark.parametrize("name", methods("batch_statistics"))  # their batch-norm layers run in train mode
def test_an_image_too_small_for_the_network_changes_nothing(name):
    adapter = tta.create_adapter(name, tta.create_model("zoo:fmnist-cnn"), **FAST.get(name, {}))
    adapter(torch.rand(4, 1, 28, 28))  # some adapted state to keep
    before = snapshot(adapter)
    # The network (two poolings) refuses it; cotta, whose augmentations need 8x8, before the network runs.
    with pytest.raises(ValueError, match=r"built for \(28, 28\)" if name != "cotta" else "at least 8x8"):
        adapter(torch.rand(2, 1, 1, 1))
    unchanged(adapter, before)


@pytest.mark.parametrize("name", methods("entropy", "batch_statistics"))
def test_outputs_that_are_not_class_scores_are_refused_without_a_trace(name):
    """A one-channel (regression) model runs before the entropy methods can tell it is not a classifier."""
    adapter = tta.create_adapter(name, tiny_model(num_classes=1), **FAST.get(name, {}))
    before = snapshot(adapter)
    with pytest.raises(ValueError, match="needs class scores"):
        adapter(torch.rand(4, 3, 16, 16))
    unchanged(adapter, before)


def test_cotta_refuses_images_too_small_to_augment_whatever_the_anchor_thinks():
    """Its augmentation runs only when the anchor is unsure, after the networks have run and counted the batch."""
    for threshold in (0.0, 1.0):  # augmentation never / always needed
        adapter = tta.create_adapter("cotta", tiny_model(), n_augmentations=2, confidence_threshold=threshold)
        before = snapshot(adapter)
        with pytest.raises(ValueError, match="at least 8x8"):
            adapter(torch.rand(4, 3, 4, 4))
        unchanged(adapter, before)
