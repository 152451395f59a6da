"""Stream settings: order, reset flags and domain tags."""
import pytest
import torch
from torch.utils.data import TensorDataset

from tta.data.streams import Domain, iterate_stream, stream_length


def domains():
    return [Domain(f"d{k}", TensorDataset(torch.arange(10).float()[:, None] + 100 * k, torch.arange(10)))
            for k in range(3)]


@pytest.mark.parametrize("setting", ["episodic", "continual", "reset_per_shift", "mixed"])
def test_every_image_once_and_length(setting):
    batches = list(iterate_stream(domains(), setting, 4, seed=0))
    seen = torch.cat([b.x[:, 0] for b in batches]).tolist()
    assert sorted(seen) == sorted(float(i + 100 * k) for k in range(3) for i in range(10))
    assert len(batches) == stream_length(domains(), setting, 4)
    for b in batches:
        assert torch.equal(b.domain, (b.x[:, 0] // 100).long())


def test_reset_flags():
    settings = ("episodic", "continual", "reset_per_shift", "mixed")
    flags = {s: [b.reset for b in iterate_stream(domains(), s, 4)] for s in settings}
    assert all(flags["episodic"]) and not any(flags["continual"]) and not any(flags["mixed"])
    assert flags["reset_per_shift"] == [True, False, False] * 3


def test_seeded_order_and_mixing():
    a = [b.x[:, 0].tolist() for b in iterate_stream(domains(), "continual", 4, seed=1)]
    assert a == [b.x[:, 0].tolist() for b in iterate_stream(domains(), "continual", 4, seed=1)]
    assert a != [b.x[:, 0].tolist() for b in iterate_stream(domains(), "continual", 4, seed=2)]
    mixed = list(iterate_stream(domains(), "mixed", 10, seed=0))
    assert any(len(b.domain.unique()) > 1 for b in mixed)
    with pytest.raises(ValueError, match="stream setting"):
        list(iterate_stream(domains(), "online", 4))
