"""Test streams: how the domains of a benchmark reach an adapter.

    episodic         every batch starts from the source model (the adapter resets after each batch)
    continual        one model adapts through all domains in order, never reset (CoTTA's setting)
    reset_per_shift  the model adapts within a domain and is reset when the domain changes (TENT's setting)
    mixed            all domains shuffled into one stream, never reset (mixed distribution shifts, SAR)

The stream only says *when* to reset; the runner does it, so every method gets the same protocol.
The order within a domain is a seeded permutation (ImageNet-C folders are sorted by class, and a batch of one
class would distort every method that uses batch statistics); with the same seed, every method sees the same
images in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ..registry import unknown_name_message

SETTINGS = ("episodic", "continual", "reset_per_shift", "mixed")


def check_setting(name: str) -> str:
    if name not in SETTINGS:
        raise ValueError(unknown_name_message("stream setting", name, SETTINGS))
    return name


@dataclass
class Domain:
    """One test distribution: a corruption at a severity, a data set, or "clean"."""
    name: str
    dataset: Dataset                                   # yields (image in [0, 1], target)
    severity: Optional[int] = None
    class_names: Optional[List[str]] = None            # set when each domain needs its own head (zero-shot)
    templates: Optional[Sequence[str]] = None
    class_subset: Optional[List[int]] = None           # score only these outputs (ImageNet-A/R)
    info: dict = field(default_factory=dict)           # extra descriptors stored in result rows

    @property
    def label(self) -> str:
        return f"{self.name}-{self.severity}" if self.severity is not None else self.name


@dataclass
class StreamBatch:
    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor     # (B,) index into the domain list, per example
    reset: bool              # reset the adapter before this batch
    index: int               # batch number within its domain (continual) or within the stream (mixed)
    ids: Optional[torch.Tensor] = None  # (B,) each example's index in its domain's data set: pairs methods per image


class _Tagged(Dataset):
    def __init__(self, dataset: Dataset, tag: int):
        self.dataset, self.tag = dataset, tag

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, self.tag


def _loader(dataset: Dataset, order: Sequence[int], batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(Subset(dataset, list(order)), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def domain_order(n: int, seed: int, shuffle: bool = True) -> List[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g).tolist()


def stream_length(domains: Sequence[Domain], setting: str, batch_size: int) -> int:
    """Number of batches the stream yields (for progress bars)."""
    if setting == "mixed":
        return -(-sum(len(d.dataset) for d in domains) // batch_size)
    return sum(-(-len(d.dataset) // batch_size) for d in domains)


def iterate_domain(domains: Sequence[Domain], k: int, setting: str, batch_size: int, seed: int = 0,
                   shuffle: bool = True, num_workers: int = 0) -> Iterator[StreamBatch]:
    """The batches of domain k alone, with the reset flags of `setting` (not for "mixed")."""
    check_setting(setting)
    if setting == "mixed":
        raise ValueError("the mixed setting has no per-domain streams; use iterate_stream")
    d = domains[k]
    order = domain_order(len(d.dataset), seed, shuffle)
    loader = _loader(d.dataset, order, batch_size, num_workers)
    for b, (x, y) in enumerate(loader):
        reset = setting == "episodic" or (setting == "reset_per_shift" and b == 0)
        ids = torch.as_tensor(order[b * batch_size:b * batch_size + len(x)], dtype=torch.long)
        yield StreamBatch(x, y, torch.full((len(x),), k, dtype=torch.long), reset, b, ids)


def iterate_stream(domains: Sequence[Domain], setting: str, batch_size: int, seed: int = 0, shuffle: bool = True,
                   num_workers: int = 0) -> Iterator[StreamBatch]:
    """All batches of the setting, in order."""
    check_setting(setting)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if setting != "mixed":
        for k in range(len(domains)):
            yield from iterate_domain(domains, k, setting, batch_size, seed, shuffle, num_workers)
        return
    joined = ConcatDataset([_Tagged(d.dataset, k) for k, d in enumerate(domains)])
    offsets = torch.as_tensor([0] + joined.cumulative_sizes[:-1], dtype=torch.long)
    # Mixed: one permutation over all (domain, image) pairs, so every batch mixes shifts.
    order = domain_order(len(joined), seed, shuffle)
    for b, (x, y, tag) in enumerate(_loader(joined, order, batch_size, num_workers)):
        ids = torch.as_tensor(order[b * batch_size:b * batch_size + len(x)], dtype=torch.long) - offsets[tag.long()]
        yield StreamBatch(x, y, tag.long(), False, b, ids)
