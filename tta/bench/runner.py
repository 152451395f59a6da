"""Run a benchmark: every (method, setting, seed) over the domains of the data, one result row per domain.

Rows already in the results file are skipped, so an interrupted run picks up where it stopped. Settings whose
model carries state across domains (continual, mixed) replay the stream from its start when any of their rows
is missing, and write only the missing rows: the adapted state a row depends on is never skipped. Random draws
are seeded per episodic batch and per reset_per_shift domain, so a row computed alone equals the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Protocol

import torch
from torch.utils.data import Subset

from ..data.streams import Domain, StreamBatch, iterate_domain, iterate_stream
from ..devices import check_device
from .datasets import BuildContext, build_domains
from .metrics import Meter, make_meter
from .results import (ResultStore, config_id, device_description, file_sha256, git_revision, package_versions,
                      row_key, run_lock)
from .fields import expand_path
from .spec import BenchmarkSpec, MethodSpec, ModelSpec

MAX_CURVE_POINTS = 100


@dataclass
class Job:
    method: MethodSpec
    setting: str
    seed: int
    batch_size: int
    config: Dict[str, Any]       # the adapter's full config (defaults + overrides + the setting's `episodic`)

    @property
    def config_id(self) -> str:
        return config_id(self.config, ("adapter", f"adapter:{self.method.name}"))


def plan_jobs(spec: BenchmarkSpec, methods: List[MethodSpec]) -> List[Job]:
    """All (method, setting, seed) runs; configs are resolved (and typos caught) before anything runs."""
    jobs = []
    for m in methods:
        base = m.resolved_config()
        for setting in m.settings or spec.settings:
            cfg = dataclasses.replace(base, episodic=setting == "episodic")  # the setting owns resetting
            for seed in spec.seeds:
                jobs.append(Job(m, setting, seed, m.batch_size or spec.batch_size, dataclasses.asdict(cfg)))
    return jobs


def data_descriptor(spec: BenchmarkSpec, limit: Optional[int]) -> Dict[str, Any]:
    """What defines the data of a row, without machine-specific paths (root, cache)."""
    desc = {k: v for k, v in dataclasses.asdict(spec.data).items() if k not in ("root", "cache")}
    desc["limit"] = limit
    return desc


# ModelSpec fields that the label already names (or, for weights, that the content hash stands for).
_LABELLED_MODEL_FIELDS = ("name", "factory", "weights", "pretrained")


def model_id(spec: BenchmarkSpec, m: Optional[ModelSpec] = None) -> str:
    """The model a row was computed with, as its key names it: the benchmark's model, or a method's own (`m`).

    A hub or zoo name with nothing else set keys as the name alone, as rows always have, so the committed results
    keep matching. Anything else that decides the network, a weights file or any other model field (factory
    `kwargs`, input size, class names, normalisation), adds `#<hash>` of the weight file's *content* and of those
    fields: a resumed run then never takes a row of another checkpoint or other kwargs for its own, and a
    checkpoint copied to another folder or machine keeps its rows. The resolved path is recorded in the row
    (`model_info`), not in the key.
    """
    m = m or spec.model
    weights = _weights_path(m)
    label = f"{m.label}+{weights.name}" if weights else (m.label if m.pretrained else f"{m.label}+random")
    identity = _model_fields(m)
    if weights is not None:
        identity["weights_sha256"] = file_sha256(weights)
    return f"{label}#{config_id(identity)[:8]}" if identity else label


def model_info(m: ModelSpec) -> Dict[str, Any]:
    """What a row records about its model: the fields the benchmark file gives, and the checkpoint used (its path
    and content hash; a zoo model's shipped checkpoint too)."""
    info: Dict[str, Any] = {k: v for k, v in (("name", m.name), ("factory", m.factory)) if v is not None}
    info.update(_model_fields(m))
    weights = _weights_path(m)
    if weights is None and m.name and m.name.startswith("zoo:"):
        from ..zoo import checkpoint_path
        try:
            weights = checkpoint_path(m.name[len("zoo:"):])
        except KeyError:  # not a zoo member: building the model says so, with the members
            weights = None
        weights = weights if weights is not None and weights.exists() else None
    if weights is not None:
        info.update(weights=str(weights.resolve()), weights_sha256=file_sha256(weights))
    if not m.pretrained:
        info["pretrained"] = False
    return info


def _weights_path(m: ModelSpec) -> Optional[Path]:
    """The weight file `m` names, with ~ and $VARS expanded; an error says what is missing before anything runs."""
    if not m.weights:
        return None
    path = expand_path(m.weights, "model.weights", "or edit model.weights")
    if not path.exists():
        raise FileNotFoundError(f"model.weights {str(path)!r} does not exist; pass the path of a local checkpoint "
                                "(.pth/.pt/.safetensors) or remove model.weights")
    return path


def _model_fields(m: ModelSpec) -> Dict[str, Any]:
    """The model fields set to something other than their default, besides those the label names. A field added to
    ModelSpec later with its default is left out, so it changes no key. `class_names: data` is left out too: the
    data names the classes, and the data is keyed apart."""
    out = {}
    for f in dataclasses.fields(m):
        value = getattr(m, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in _LABELLED_MODEL_FIELDS or value == default or (f.name == "class_names" and value == "data"):
            continue
        out[f.name] = value
    return out


class _Progress:
    """tqdm bars: one over all batches to run (with ETA) and one per domain."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tqdm.auto import tqdm
            self.tqdm = tqdm
            self.overall = tqdm(total=total, desc="overall", unit="batch", position=0)

    def domain(self, total: int, desc: str):
        if not self.enabled:
            return None
        return self.tqdm(total=total, desc=desc, unit="batch", position=1, leave=False)

    def close(self):
        if self.enabled:
            self.overall.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def thin_curve(curve: List[List[float]]) -> List[List[float]]:
    """At most MAX_CURVE_POINTS points of a running curve, evenly spaced, always keeping the last."""
    if len(curve) <= MAX_CURVE_POINTS:
        return curve
    step = len(curve) / MAX_CURVE_POINTS
    keep = sorted({int(i * step) for i in range(MAX_CURVE_POINTS)} | {len(curve) - 1})
    return [curve[i] for i in keep]


# ---- which rows a runner computes, and where they go ----------------------------------------------------------
class ShardPolicy:
    """Which rows this process computes, and which batches of a domain it runs: all of them, in one process.
    tta.bench.distributed deals them out over the ranks of a torchrun."""

    def runs(self, jobs: List[Job], j: int, k: int) -> bool:
        """Whether this process computes domain k of jobs[j] (when its row is missing)."""
        return True

    def batches(self, job: Job, domains: List[Domain], k: int, shuffle: bool,
                num_workers: int) -> Iterator[StreamBatch]:
        """The batches of domain k that this process runs for `job` (not for the mixed setting)."""
        return iterate_domain(domains, k, job.setting, job.batch_size, job.seed, shuffle, num_workers)


@dataclass
class RowOrigin:
    """What a row was computed from, beyond its own fields: for sinks that keep more than the row."""
    job: int                        # index in Runner.jobs
    domain: int                     # index in the run's domain list
    meter: Meter
    # per batch of a per-domain stream, in the order run: its index in the domain, n, labelled (None for dense
    # targets) and model seconds; empty for the mixed setting
    batches: List[Dict[str, Any]]


class RowSink(Protocol):
    """Where a runner's rows go, and which rows are done already (a rerun skips them)."""

    def session(self) -> ContextManager[None]:
        """Held while the runner runs."""

    def has(self, row: Dict[str, Any]) -> bool:
        """Whether `row` (its key fields) is done."""

    def write(self, row: Dict[str, Any], origin: RowOrigin) -> bool:
        """Keep `row`; False when it was there already."""


class ResultsFile:
    """The row sink of one process: the JSON-lines results file, which also says which rows are done."""

    def __init__(self, out):
        self.store = ResultStore(out)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Held while a runner runs: a second run on the same file at the same time is refused (ResultsBusyError)
        rather than computing and writing every row again."""
        with run_lock(self.store.path):
            self.store.reload()  # rows a run that finished since we opened the file has written
            yield

    def has(self, row: Dict[str, Any]) -> bool:
        return row_key(row) in self.store

    def write(self, row: Dict[str, Any], origin: RowOrigin) -> bool:
        return self.store.append(row)


class Runner:
    def __init__(self, spec: BenchmarkSpec, out, methods: Optional[List[str]] = None, limit: Optional[int] = None,
                 device: Optional[str] = None, data_root: Optional[str] = None, download: bool = False,
                 progress: bool = True, num_workers: Optional[int] = None, allow_code: bool = False,
                 on_error: str = "raise", shard: Optional[ShardPolicy] = None, sink: Optional[RowSink] = None):
        """`allow_code` lets the benchmark's `factory:` fields call functions outside tta.bench.factories's
        allowed packages: give it only for a file you trust, as a factory runs code. `on_error="skip"` drops
        unreadable image files (each row records how many in domain_info.skipped_files). `shard` says which rows
        and batches this process computes (default: all), `sink` where its rows go and which are done (default:
        the results file `out`); tta.bench.distributed gives both for a rank of a torchrun."""
        if data_root is not None:
            spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, root=str(data_root)))
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be a positive number of images per domain, got {limit}")
        self.device = check_device(device)
        selected = spec.select(methods)
        spec.check_factories(selected, allow_code)  # before anything is built, imported or written
        self.allow_code = allow_code
        self.on_error = on_error
        self.spec = spec
        self.shard = shard if shard is not None else ShardPolicy()
        self.sink = sink if sink is not None else ResultsFile(out)
        self.jobs = plan_jobs(spec, selected)
        for job in self.jobs:
            if job.method.record_steps and job.setting == "mixed":
                raise ValueError(f"method {job.method.label}: record_steps works per domain; the mixed setting "
                                 "interleaves domains in a batch: give the method settings without mixed")
        self.limit = limit
        self.written = 0  # rows this run has written so far (read after an interruption)
        self.download = download
        self.progress = progress
        self.num_workers = spec.num_workers if num_workers is None else num_workers
        self.data = data_descriptor(spec, limit)
        self.data_id = f"{spec.data.kind}:{config_id(self.data, ('data', f'data:{spec.data.kind}'))}"
        self.model_id = model_id(spec)
        # per ModelSpec (the benchmark's and each method's own): hashing a checkpoint once per run is enough
        self._models = {id(m): (model_id(spec, m), model_info(m))
                        for m in [spec.model] + [m.model for m in selected if m.model is not None]}
        self.provenance = {"device": device_description(str(self.device)), "versions": package_versions(),
                           "git": git_revision(), "threads": torch.get_num_threads()}

    # ---- keys ----------------------------------------------------------------------------------------------
    def job_key(self, job: Job) -> Dict[str, Any]:
        """The key fields a job's rows share (every one but the domain's)."""
        return {"benchmark": self.spec.name, "method": job.method.label, "config_id": job.config_id,
                "model": self._models[id(job.method.model or self.spec.model)][0],
                "data_id": self.data_id + (f"+first{job.method.limit}" if job.method.limit else ""),
                "setting": job.setting, "batch_size": job.batch_size, "seed": job.seed}

    def _row_base(self, job: Job, domain: Domain) -> Dict[str, Any]:
        row = self.job_key(job)
        row["data_id"] += domain.info.get("data_id_suffix", "")  # files --on-error skip dropped (tta.bench.datasets)
        row.update({"adapter": job.method.name, "config": job.config, "data": self.data, "domain": domain.name,
                    "severity": domain.severity})
        return row

    def _missing(self, j: int, domains: List[Domain]) -> List[bool]:
        """Per domain, whether this process is to compute its row of jobs[j]: not done yet, and its share."""
        job = self.jobs[j]
        return [not self.sink.has(self._row_base(job, d)) and self.shard.runs(self.jobs, j, k)
                for k, d in enumerate(domains)]

    # ---- running -------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, int]:
        """Run every job; returns counts of rows written and skipped. A second run on the same results file at the
        same time is refused (ResultsBusyError) rather than computing and writing every row again."""
        with self.sink.session():
            return self._run()

    def _run(self) -> Dict[str, int]:
        spec = self.spec
        base_model = None
        if spec.model.per_domain:
            bad = [j.setting for j in self.jobs if j.setting in ("continual", "mixed")]
            if bad:
                raise ValueError(f"model.class_names: data gives each domain its own model head, so the stream "
                                 f"cannot carry one model across domains; use episodic or reset_per_shift, not {bad}")
            input_size, class_names, task = tuple(spec.model.input_size), None, None
        else:
            base_model = spec.model.build(allow_code=self.allow_code).eval()
            input_size, class_names, task = base_model.input_size, base_model.class_names, base_model.task
        ctx = BuildContext(tuple(input_size), class_names, self.download, self.limit, self.on_error)
        domains = all_domains = build_domains(spec.data, ctx)
        if not domains:
            raise ValueError("the data section yields no domains; list corruptions or set clean: true")

        todo = []
        for j, job in enumerate(self.jobs):
            missing = self._missing(j, domains)
            if not any(missing):
                continue
            replay = job.setting in ("continual", "mixed")
            run_domains = list(range(len(domains))) if replay else [k for k, m in enumerate(missing) if m]
            todo.append((j, run_domains))
        skipped = sum(len(domains) for _ in self.jobs) - sum(sum(self._missing(j, domains)) for j, _ in todo)
        total = sum(-(-len(_limited(domains, self.jobs[j].method.limit)[k].dataset) // self.jobs[j].batch_size)
                    for j, ks in todo for k in ks)
        bars = _Progress(total, self.progress)
        written = 0
        try:
            for j, ks in todo:
                job = self.jobs[j]
                torch.manual_seed(job.seed)
                domains = _limited(all_domains, job.method.limit)
                if spec.model.per_domain:
                    for k in ks:
                        d = domains[k]
                        torch.manual_seed(domain_seed(job.seed, k))  # whatever building the model draws
                        model = spec.model.build(d.class_names, d.templates, allow_code=self.allow_code).eval()
                        adapter = self._adapter(job, model)
                        written += self._run_domains(j, adapter, domains, [k], model.task, bars)
                        del adapter, model
                else:
                    # A method may bring its own model (e.g. it3 needs a network trained to take y as input).
                    model = (job.method.model.build(allow_code=self.allow_code).eval() if job.method.model
                             else copy.deepcopy(base_model))
                    adapter = self._adapter(job, model)
                    own_task = getattr(model, "task", None) or task  # a slot model is scored as object discovery
                    if job.setting == "mixed":
                        written += self._run_mixed(j, adapter, domains, own_task, bars)
                    else:
                        written += self._run_domains(j, adapter, domains, ks, own_task, bars)
                    del adapter
        finally:
            bars.close()
        return {"written": written, "skipped": skipped, "jobs": len(self.jobs)}

    def _adapter(self, job: Job, model: torch.nn.Module):
        from ..adapter import create_adapter
        from .source_data import prepare_adapter  # clean images a method asks for first (EATA's Fisher)
        adapter = create_adapter(job.method.name, model.to(self.device), **job.config)
        return prepare_adapter(adapter, self.spec.data, job.batch_size, job.seed, self.device, self.download,
                               self.on_error, self.num_workers, job.method.label)

    def _meter(self, domain: Domain, task: str, model_classes: Optional[int], record_steps: bool = False):
        n = len(domain.class_names) if domain.class_names else model_classes
        return make_meter(task, n, domain.class_subset, record_steps)

    def _step(self, adapter, x: torch.Tensor) -> (torch.Tensor, float):
        x = x.to(self.device, non_blocking=True)
        _sync(self.device)
        start = time.perf_counter()
        out = adapter(x)
        _sync(self.device)
        return out.detach(), time.perf_counter() - start

    def _run_domains(self, j: int, adapter, domains: List[Domain], ks: List[int], task: str, bars) -> int:
        job, written = self.jobs[j], 0
        classes = len(adapter.model.class_names) if getattr(adapter.model, "class_names", None) else None
        record_steps = job.method.record_steps
        if record_steps and not adapter.records_steps:
            raise ValueError(f"method {job.method.label}: record_steps needs a method that reports each step's "
                             f"outputs; {job.method.name} does not (those that do: diffusion_tta)")
        for k in ks:
            d = domains[k]
            meter = self._meter(d, task, classes, record_steps)
            curve, model_s, batches, log = [], 0.0, 0, []
            events_before = dict(getattr(adapter, "guard_events", {}))
            bar = bars.domain(-(-len(d.dataset) // job.batch_size), f"{job.method.label} {job.setting} {d.label}")
            start = time.perf_counter()
            if job.setting == "reset_per_shift":
                # Each domain starts from the source model, and from a random state of its own: a resumed run or
                # a torchrun rank that computes only this domain draws what the uninterrupted run drew.
                torch.manual_seed(domain_seed(job.seed, k))
            for batch in self.shard.batches(job, domains, k, self.spec.shuffle, self.num_workers):
                if batch.reset and job.setting != "episodic":  # episodic adapters reset themselves after each call
                    adapter.reset()
                if job.setting == "episodic":
                    # An episode's random draws (augmented views, (t, eps) pairs) then depend only on the run's
                    # seed, the domain and the batch, not on which batches ran before: a torchrun shard or a
                    # resumed run gives the rows of one uninterrupted process.
                    torch.manual_seed(episode_seed(job.seed, k, batch.index))
                if record_steps:
                    adapter.outputs_by_step = []
                out, seconds = self._step(adapter, batch.x)
                meter.update(out, batch.y, batch.ids, **({"steps": adapter.outputs_by_step} if record_steps else {}))
                log.append({"index": batch.index, "n": len(batch.x),
                            "labelled": int((batch.y >= 0).sum()) if batch.y.dim() == 1 else None,
                            "seconds": round(seconds, 6)})
                model_s += seconds
                batches += 1
                curve.append([batches, meter.n, meter.running(), round(model_s, 4)])
                if bar is not None:
                    bar.update()
                    bars.overall.update()
            if bar is not None:
                bar.close()
            written += self._write(RowOrigin(j, k, meter, log), d, curve, batches, model_s,
                                   time.perf_counter() - start, task,
                                   _new_events(events_before, getattr(adapter, "guard_events", {})))
        return written

    def _run_mixed(self, j: int, adapter, domains: List[Domain], task: str, bars) -> int:
        job = self.jobs[j]
        classes = len(adapter.model.class_names) if getattr(adapter.model, "class_names", None) else None
        meters = [self._meter(d, task, classes) for d in domains]
        curves: List[List[list]] = [[] for _ in domains]
        batches, model_s = [0] * len(domains), 0.0
        bar = bars.domain(-(-sum(len(d.dataset) for d in domains) // job.batch_size), f"{job.method.label} mixed")
        start = time.perf_counter()
        for batch in iterate_stream(domains, "mixed", job.batch_size, job.seed, self.spec.shuffle, self.num_workers):
            out, seconds = self._step(adapter, batch.x)
            model_s += seconds
            for k in batch.domain.unique().tolist():
                sel = batch.domain == k
                ids = None if batch.ids is None else batch.ids[sel]
                meters[k].update(out[sel.to(out.device)], batch.y[sel], ids)
                batches[k] += 1
                curves[k].append([batch.index + 1, meters[k].n, meters[k].running(), round(model_s, 4)])
            if bar is not None:
                bar.update()
                bars.overall.update()
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - start
        # In a mixed stream the time is shared: each domain's row carries the whole stream's time.
        return sum(self._write(RowOrigin(j, k, meters[k], []), d, curves[k], batches[k], model_s, wall, task)
                   for k, d in enumerate(domains))

    def _write(self, origin: RowOrigin, domain: Domain, curve, batches: int, model_s: float, wall_s: float,
               task: str, guard_events: Optional[Dict[str, int]] = None) -> int:
        job, meter = self.jobs[origin.job], origin.meter
        row = self._row_base(job, domain)
        row.update({
            "guard_events": guard_events or {},  # divergence-guard interventions during this domain
            "task": task, "metrics": meter.compute(), "primary_metric": meter.primary, "n": meter.n,
            # each image's index in the domain and its outcome, so any two methods on the same images pair up
            "per_image": meter.per_image(),
            "n_batches": batches, "steps_per_batch": job.config.get("steps"), "seconds": round(wall_s, 4),
            "seconds_model": round(model_s, 4), "curve": thin_curve(curve), "domain_info": domain.info,
            "mce_baseline": self.spec.mce_baseline,
            "model_info": self._models[id(job.method.model or self.spec.model)][1],  # which checkpoint, exactly
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.provenance,
        })
        written = int(self.sink.write(row, origin))
        self.written += written
        return written


def episode_seed(seed: int, domain: int, batch: int) -> int:
    """The torch seed of one episodic batch (a fixed mix of the three, so neighbours do not share draws)."""
    return (seed * 1_000_003 + domain * 10_007 + batch * 101 + 1) % (2 ** 63)


def domain_seed(seed: int, domain: int) -> int:
    """The torch seed at the start of domain `domain` of a reset_per_shift stream (episode_seed's mix, batch -1, so
    it is not the seed of any episodic batch)."""
    return episode_seed(seed, domain, -1)


def _limited(domains: List[Domain], limit: Optional[int]) -> List[Domain]:
    """The first `limit` images of each domain (domains are already seeded random subsets)."""
    if limit is None:
        return domains
    return [d if len(d.dataset) <= limit else dataclasses.replace(d, dataset=Subset(d.dataset, range(limit)))
            for d in domains]


def _new_events(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def run_benchmark(spec: BenchmarkSpec, out, **kwargs) -> Dict[str, int]:
    """Run `spec`, appending rows to the JSON-lines file `out` (see Runner for the keyword arguments)."""
    return Runner(spec, out, **kwargs).run()
