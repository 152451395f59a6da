"""How many CPU threads torch may use: `--threads N`, else the TTA_THREADS environment variable, else no more
than the cores this process may run on.

Why: on a shared or small machine torch's default (one thread per physical core) oversubscribes as soon as
anything else runs; one Diffusion-TTA image measured 4-5 s with 1 thread and 61-74 s with 2 while another job
ran. OMP_NUM_THREADS, when set, is torch's own setting and is kept unless --threads or TTA_THREADS say otherwise.
"""
from __future__ import annotations

import os
from typing import Optional

ENV = "TTA_THREADS"


def usable_cores() -> int:
    """Cores this process is allowed to run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def parse_threads(value, origin: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"{origin} must be a positive number of threads, got {value!r}")
    return n


def configure_threads(requested: Optional[int] = None) -> int:
    """Set torch's intra-op threads and return the number in use."""
    import torch
    if requested is not None:
        n = parse_threads(requested, "--threads")
    elif os.environ.get(ENV):
        n = parse_threads(os.environ[ENV], ENV)
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        n = min(torch.get_num_threads(), usable_cores())
    torch.set_num_threads(n)
    return torch.get_num_threads()


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help=f"CPU threads for torch (default: ${ENV}, else OMP_NUM_THREADS, else at most the cores "
                             "this process may use); recorded in every result row")
