"""`tta bench` on several processes: torchrun (one node or many) with the env-var protocol of torch.distributed.

    torchrun --nproc_per_node 4 -m tta bench benchmarks/quick.yaml --out results/quick.jsonl
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 -m tta bench ...

When WORLD_SIZE > 1, `tta bench` runs a `Runner` on every rank (gloo process group from the env vars) with this
rank's share of the work (`RankShare`) and its own row sink (`RankSink`):

- episodic streams are sharded by example: rank r runs batches r, r + W, r + 2W, ... of every domain (batches
  of the seeded order, so each batch holds the same images as in a single-process run) and writes a *shard
  row* that carries its meter's state; the merge rebuilds one meter per domain from the shards and computes the
  metrics exactly (accuracy and ECE from the pooled per-example confidences, confusion matrices and depth sums
  added);
- reset_per_shift streams are sharded by domain (each (job, domain) unit is one rank's: the model is reset at
  the start of every domain, so a domain does not depend on the others);
- continual and mixed streams carry the adapted state from one domain to the next, so splitting them would
  change their results: a whole (method, setting, seed) stream is one rank's unit.
  Units are dealt round-robin over the ranks in plan order.

Each rank appends only to its own file, `<out stem>.rank<r>.jsonl` beside `--out` (so no two processes ever
write to one file), with the same flush + fsync + lock as the results store. After a barrier, every rank sends
its rows to rank 0 (gather over gloo, so nodes need no shared file system), which writes the merged rows to
`--out`, deduplicated by row key. A rerun skips rows that are in `--out` or in any rank file (the ranks exchange
the keys of their files at start), and shard rows of the same world size.

Exactness: with a deterministic method the merged rows equal a single-process run's (tests/test_distributed.py).
Random methods too in episodic and reset_per_shift streams: the runner seeds torch's global generator per episode
from (seed, domain, batch) and at the start of each reset_per_shift domain from (seed, domain), so MEMO's
augmentations, CoTTA's restores or a Diffusion-TTA without `seed` draw the same on any rank. Timing fields of
merged episodic rows: `seconds` is the slowest shard's wall time, `seconds_model` the sum over shards (total
compute).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch

from ..data.streams import StreamBatch, domain_order
from .metrics import merge_meters
from .results import ResultStore, append_row, row_key, run_lock
from .runner import Job, RowOrigin, Runner, ShardPolicy, thin_curve

SHARD_FIELD = "shard"          # in rank rows of episodic shards: {"rank", "world_size", "meter", "batches"}
ORDER_FIELD = "_order"         # in rank rows: [job index, domain index], to write the merged file in plan order


# ---- the env-var protocol ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def distributed_env() -> DistEnv:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (a single process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torch.distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank, world, local)


def init_process_group() -> None:
    """gloo from the env vars (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Ranks may finish hours apart, so the
    barrier's timeout is long: TTA_DIST_TIMEOUT_S, default 7 days."""
    import torch.distributed as dist
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("TTA_DIST_TIMEOUT_S", 7 * 24 * 3600)))
        dist.init_process_group("gloo", timeout=timeout)


def rank_file(out, rank: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}.jsonl")


def shard_key(key: str, world_size: int, rank: int) -> str:
    return json.dumps([key, world_size, rank])


def merge_shard_rows(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The row of a whole domain from the shard rows of all ranks (one per rank, same key and world size)."""
    rows = sorted(rows, key=lambda r: r[SHARD_FIELD]["rank"])
    world = rows[0][SHARD_FIELD]["world_size"]
    if [r[SHARD_FIELD]["rank"] for r in rows] != list(range(world)):
        raise ValueError(f"merging needs one shard per rank 0..{world - 1}, got ranks "
                         f"{[r[SHARD_FIELD]['rank'] for r in rows]}")
    meter = merge_meters([r[SHARD_FIELD]["meter"] for r in rows])
    batches = sorted((b for r in rows for b in r[SHARD_FIELD]["batches"]), key=lambda b: b["index"])
    curve, n, labelled, correct, seconds = [], 0, 0, 0, 0.0
    for i, b in enumerate(batches, 1):
        n, seconds = n + b["n"], seconds + b["seconds"]
        running = None
        if b.get("correct") is not None:
            labelled, correct = labelled + b["labelled"], correct + b["correct"]
            running = correct / labelled if labelled else None
        curve.append([i, n, running, round(seconds, 4)])
    events: Dict[str, int] = {}
    for r in rows:
        for k, v in (r.get("guard_events") or {}).items():
            events[k] = events.get(k, 0) + v
    row = {k: v for k, v in rows[0].items() if k not in (SHARD_FIELD, ORDER_FIELD)}
    row.update({
        "metrics": meter.compute(), "per_image": meter.per_image(),
        "n": sum(r["n"] for r in rows), "n_batches": sum(r["n_batches"] for r in rows),
        "seconds": max(r["seconds"] for r in rows), "seconds_model": round(sum(r["seconds_model"] for r in rows), 4),
        "guard_events": events, "curve": thin_curve(curve), "finished": max(r["finished"] for r in rows),
        "distributed": {"world_size": world, "sharded_by": "example"},
    })
    return row


# ---- the rank's own file ----------------------------------------------------------------------------------
class RankStore(ResultStore):
    """A rank's own JSON-lines file. Full rows are keyed as in the results store; shard rows by (key, world
    size, rank), so a rerun with another world size computes its own shards."""

    def __init__(self, path, known_full: set, known_shards: set):
        super().__init__(path)
        self.shard_keys = set()
        self.keys = set()
        for r in self.rows():
            self._remember(r)
        self.known_full = known_full      # full keys in --out or in any rank file
        self.known_shards = known_shards  # shard keys in any rank file
        self.merged_keys: set = set()     # full keys in --out (rank 0's copy)

    @staticmethod
    def key_of(row: Dict[str, Any]) -> Tuple[str, bool]:
        shard = row.get(SHARD_FIELD)
        if shard:
            return shard_key(row_key(row), shard["world_size"], shard["rank"]), True
        return row_key(row), False

    def _remember(self, row) -> None:
        key, is_shard = self.key_of(row)
        (self.shard_keys if is_shard else self.keys).add(key)

    def append(self, row: Dict[str, Any]) -> bool:
        key, is_shard = self.key_of(row)
        if key in (self.shard_keys if is_shard else self.keys):
            return False
        append_row(self.path, row)
        self._remember(row)
        return True


# ---- which rows a rank computes -------------------------------------------------------------------------------
class RankShare(ShardPolicy):
    """Rank `rank` of `world_size`: a share of every episodic domain's batches, and whole units of the other
    settings dealt round-robin over the ranks in plan order (see the module doc)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def runs(self, jobs: List[Job], j: int, k: int) -> bool:
        if jobs[j].setting == "episodic":
            return True  # every rank runs its batches of every domain
        # (job index, domain index) for reset_per_shift, (job index, None) for a whole stream -> a unit number;
        # the domain count is not known before the data is built, so domain k of job j is unit (first of j) + k
        unit = sum(1 for job in jobs[:j] if job.setting != "episodic")
        return (unit + (k if jobs[j].setting == "reset_per_shift" else 0)) % self.world_size == self.rank

    def batches(self, job: Job, domains, k: int, shuffle: bool, num_workers: int) -> Iterator[StreamBatch]:
        if job.setting != "episodic":
            yield from super().batches(job, domains, k, shuffle, num_workers)
            return
        d = domains[k]
        order = domain_order(len(d.dataset), job.seed, shuffle)
        chunks = [order[i:i + job.batch_size] for i in range(0, len(order), job.batch_size)]
        mine = list(range(self.rank, len(chunks), self.world_size))
        if not mine:
            return
        from torch.utils.data import DataLoader, Subset
        # Only the last chunk can be short, and it is last in `mine` too: batching the concatenation gives back
        # exactly this rank's chunks.
        loader = DataLoader(Subset(d.dataset, [i for b in mine for i in chunks[b]]), batch_size=job.batch_size,
                            shuffle=False, num_workers=num_workers)
        for b, (x, y) in zip(mine, loader):
            yield StreamBatch(x, y, torch.full((len(x),), k, dtype=torch.long), True, b,
                              torch.as_tensor(chunks[b], dtype=torch.long))


# ---- where a rank's rows go ------------------------------------------------------------------------------------
class RankSink:
    """The row sink of one rank: its own file (RankStore). A row counts as done when --out (`merged`, read here
    and written only by rank 0's merge) or any rank's file has it, or, for an episodic shard, when this rank's
    shard of it at this world size is in any rank file. Episodic rows are written as shard rows that carry the
    meter's state and the batches run, for the merge."""

    def __init__(self, store: RankStore, merged: ResultStore, rank: int, world_size: int):
        self.store, self.merged = store, merged
        self.rank, self.world_size = rank, world_size

    def session(self) -> ContextManager[None]:
        return contextlib.nullcontext()  # run_distributed holds the locks, from before the ranks exchange keys

    def exchange_keys(self) -> None:
        """Every rank learns the full keys of --out (rank 0's) and the keys of every rank's file."""
        import torch.distributed as dist
        mine = (sorted(self.store.keys), sorted(self.store.shard_keys),
                sorted(self.merged.keys) if self.rank == 0 else [])
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        for full, shards, merged in gathered:
            self.store.known_full.update(full, merged)
            self.store.known_shards.update(shards)
            self.store.merged_keys.update(merged)

    def has(self, row: Dict[str, Any]) -> bool:
        key = row_key(row)
        if key in self.store.known_full or key in self.merged or key in self.store.keys:
            return True
        if row["setting"] != "episodic":
            return False
        skey = shard_key(key, self.world_size, self.rank)
        return skey in self.store.shard_keys or skey in self.store.known_shards

    def write(self, row: Dict[str, Any], origin: RowOrigin) -> bool:
        extra: Dict[str, Any] = {ORDER_FIELD: [origin.job, origin.domain]}
        if row["setting"] == "episodic":
            correct = getattr(origin.meter, "correct", None)
            log, start = copy.deepcopy(origin.batches), 0
            for b in log:  # correct predictions per batch, for the merged running-accuracy curve
                if isinstance(correct, list) and b["labelled"] is not None:
                    b["correct"] = int(sum(correct[start:start + b["labelled"]]))
                    start += b["labelled"]
            extra[SHARD_FIELD] = {"rank": self.rank, "world_size": self.world_size, "meter": origin.meter.state(),
                                  "batches": log}
        return self.store.append({**row, **extra})


# ---- merging (rank 0) ------------------------------------------------------------------------------------------
def merge_into(merged: ResultStore, rows: List[Dict[str, Any]], world_size: int) -> Dict[str, int]:
    """Write to `merged` (--out) every full row and every complete set of shards that it lacks, in plan order;
    shards of this run's world size are merged first."""
    full: Dict[str, Dict[str, Any]] = {}
    shards: Dict[Tuple[str, int], Dict[int, Dict[str, Any]]] = {}
    for r in rows:
        key = row_key(r)
        if key in merged:
            continue
        shard = r.get(SHARD_FIELD)
        if shard:
            shards.setdefault((key, shard["world_size"]), {})[shard["rank"]] = r
        else:
            full.setdefault(key, r)
    for (key, world), group in sorted(shards.items(), key=lambda kv: kv[0][1] != world_size):
        if key in full or len(group) != world:
            continue
        full[key] = merge_shard_rows(list(group.values()))
        full[key][ORDER_FIELD] = group[0][ORDER_FIELD] if 0 in group else None
    incomplete = {key for key, _ in shards if key not in full}
    if incomplete:
        warnings.warn(f"{len(incomplete)} row(s) have shards missing and were not merged; rerun to finish them")
    written = 0
    for key, r in sorted(full.items(), key=lambda kv: kv[1].get(ORDER_FIELD) or [1 << 30, 0]):
        r = {k: v for k, v in r.items() if k not in (ORDER_FIELD, SHARD_FIELD)}
        written += int(merged.append(r))
    return {"merged": written, "incomplete": len(incomplete)}


def run_distributed(spec, out, **runner_kwargs) -> Dict[str, int]:
    """Run this rank's share of `spec` and, on rank 0, merge every rank's rows into `out`. Returns this rank's
    counts (rank 0's with `merged`)."""
    with contextlib.ExitStack() as locks:
        # Each rank owns its rank file, and rank 0 also --out, which it merges into: another run on the same --out
        # (sharded or not) is refused before any process group forms.
        env = distributed_env()
        locks.enter_context(run_lock(rank_file(out, env.rank)))
        if env.rank == 0:
            locks.enter_context(run_lock(out))
        return _run_distributed(spec, out, env, **runner_kwargs)


def _run_distributed(spec, out, env: DistEnv, **runner_kwargs) -> Dict[str, int]:
    import torch.distributed as dist
    init_process_group()
    device = runner_kwargs.get("device")
    if device in (None, "cuda") and torch.cuda.is_available():
        runner_kwargs["device"] = f"cuda:{env.local_rank}"
        torch.cuda.set_device(env.local_rank)
    if env.rank != 0:
        runner_kwargs["progress"] = False
    sink = RankSink(RankStore(rank_file(out, env.rank), set(), set()), ResultStore(out), env.rank, env.world_size)
    runner = Runner(spec, out, shard=RankShare(env.rank, env.world_size), sink=sink, **runner_kwargs)
    sink.exchange_keys()
    summary = runner.run()
    dist.barrier()
    gathered: Optional[List[Any]] = [None] * env.world_size if env.rank == 0 else None
    # only what --out lacks travels (a rank file keeps every row it ever wrote)
    dist.gather_object([r for r in sink.store.rows() if row_key(r) not in sink.store.merged_keys], gathered, dst=0)
    if env.rank == 0:
        summary.update(merge_into(sink.merged, [r for rows in gathered for r in rows], env.world_size))
    dist.barrier()
    dist.destroy_process_group()
    summary.update({"rank": env.rank, "world_size": env.world_size})
    return summary
