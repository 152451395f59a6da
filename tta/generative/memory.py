"""Micro-batches sized from free memory, for the judge's forward and backward passes.

Diffusion-TTA back-propagates through the judge for every (t, eps) pair of a step. The paper's fixed micro-batch
of 15 pairs wastes a large GPU and still runs out of memory on a 24 GB card with a large judge. Here the memory
one pair costs is measured, not guessed: autograd's saved-tensor hooks report every tensor kept for the backward
pass while the judge runs on 1 and on 2 pairs; the difference is the cost of one pair (what does not grow with
the batch, such as saved weights, cancels). The micro-batch is then as many pairs as fit in a fraction of the
memory that is free now.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Tuple

import torch

# Backward needs about as much again as the saved activations (gradients of the activations, temporaries), and
# the rest of the process keeps allocating: use at most this share of the free memory, counting saved bytes twice.
FREE_MEMORY_SHARE = 0.5
BACKWARD_FACTOR = 2.0


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs (fn's graph is then dropped)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on `device`: CUDA's free memory plus what torch's cache holds unused; on the
    CPU, the kernel's MemAvailable (Linux) or the available physical pages. None when it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def micro_batch_from_memory(run_pairs: Callable[[int], object], pairs: int, device: torch.device,
                            fallback: int = 15, budget_bytes: Optional[float] = None, images: int = 1) -> int:
    """The largest micro-batch (pairs per image in one judge call, at most `pairs`) whose backward fits in the
    free memory, or in `budget_bytes` when that is smaller (a cap for a card shared with other work, or a peak
    target). A micro-batch of k pairs runs the judge on images * k inputs at once.

    run_pairs(m) runs the judge on m pairs of one image with autograd recording (as the real step does: same
    precision, same condition); it is called with m = 1 and m = 2, so measuring costs 3 judge passes whatever
    the batch. Returns `fallback` when neither the free memory nor a budget is known.
    """
    if pairs <= 1:
        return 1
    free = free_memory_bytes(device)
    limits = [b for b in (FREE_MEMORY_SHARE * free if free is not None else None, budget_bytes) if b is not None]
    if not limits:
        return min(fallback, pairs)
    one, two = saved_tensor_bytes(lambda: run_pairs(1)), saved_tensor_bytes(lambda: run_pairs(2))
    per_input = max(two - one, 1)
    fixed = max(one - per_input, 0)
    per_pair = images * per_input  # one pair for every image of the batch
    budget = min(limits) - fixed
    if budget < BACKWARD_FACTOR * per_pair:  # even one pair (per image of the batch) does not fit: say so now
        room = "allowed (memory_gb)" if budget_bytes is not None and budget_bytes == min(limits) else "free"
        warnings.warn(f"one judge pass per image of this batch needs about {_size(BACKWARD_FACTOR * per_pair)} for "
                      f"its backward, more than the {_size(max(budget, 0))} {room}; expect running out of memory. "
                      "Use fewer images per batch (per_example adapts them all at once), checkpointing: true, or "
                      "bf16 autocast", RuntimeWarning, stacklevel=2)
    return int(max(1, min(pairs, budget // (BACKWARD_FACTOR * per_pair))))


class MicroBatchSizer:
    """The micro-batch of a judge's pairs: a fixed size when one is given, else the one micro_batch_from_memory
    sizes for the input's shape, measured once per shape (the measurement runs the judge)."""

    def __init__(self):
        self.used: Optional[int] = None  # the micro-batch of the last call
        self._sized_for: Optional[Tuple[int, ...]] = None

    def __call__(self, size: int, pairs: int, shape: Tuple[int, ...], run_pairs: Callable[[int], object],
                 device: torch.device, memory_gb: Optional[float] = None) -> int:
        """`size` pairs per image, or for size 0 the sized micro-batch for inputs of `shape` (images first), within
        `memory_gb` when given."""
        if size:
            self.used = size
        elif self._sized_for != shape:
            budget = memory_gb * 2 ** 30 if memory_gb is not None else None
            self.used = micro_batch_from_memory(run_pairs, pairs, device, budget_bytes=budget, images=shape[0])
            self._sized_for = shape
        return self.used


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.1f} GB" if n_bytes >= 2 ** 29 else f"{n_bytes / 2 ** 20:.1f} MB"
