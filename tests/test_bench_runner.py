"""The runner end to end on real images (foolbox's CIFAR-10 samples) with a tiny model: rows, settings, and an
interrupted run that resumes to exactly the rows of an uninterrupted one."""
import json

import pytest
import torch

from tta.bench.datasets import BuildContext, DataConfig, register_data_kind, with_corruptions
from tta.bench.results import ResultStore, read_rows, row_key
from tta.bench.runner import Runner, run_benchmark
from tta.bench.spec import parse_spec
from tta.data.images import open_images


class Interrupt(RuntimeError):
    pass


class Flaky(torch.utils.data.Dataset):
    """Raises after `budget` reads while armed: a crash in the middle of a run."""
    budget = None

    def __init__(self, base):
        self.base = base
        self.targets = [label for _, label in base.items]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if Flaky.budget is not None:
            if Flaky.budget <= 0:
                raise Interrupt("simulated crash")
            Flaky.budget -= 1
        return self.base[i]


@register_data_kind("test-flaky-foolbox")
def _flaky(cfg: DataConfig, ctx: BuildContext):
    base = open_images("foolbox:cifar10", ctx.input_size, ctx.class_names)
    return with_corruptions(Flaky(base), cfg, "test-flaky", ctx.input_size, name="cifar10")


def spec_values(weights, kind="foolbox", cache=None, **extra):
    values = {
        "name": "tiny", "batch_size": 4,
        "model": {"name": "timm:test_resnet", "weights": str(weights), "input_size": [3, 32, 32],
                  "kwargs": {"num_classes": 10}},
        "data": {"kind": kind, "corruptions": ["gaussian_noise", "fog"], "severities": [5], "clean": True,
                 "max_images": 8, "cache": str(cache) if cache else None,
                 **({"set": "cifar10"} if kind == "foolbox" else {})},
        "settings": ["continual", "reset_per_shift", "episodic", "mixed"],
        "methods": ["source", {"name": "tent", "config": {"lr": 1e-2}}],
    }
    values.update(extra)
    return values


def comparable(rows):
    return {row_key(r): (r["metrics"], r["n"], r["n_batches"]) for r in rows}


def test_rows_cover_every_job_and_domain(tiny_weights, tmp_path):
    out = tmp_path / "r.jsonl"
    summary = run_benchmark(parse_spec(spec_values(tiny_weights, cache=tmp_path / "c")), out, progress=False)
    rows = read_rows(out)
    assert summary == {"written": 24, "skipped": 0, "jobs": 8} and len(rows) == 24
    assert len({row_key(r) for r in rows}) == 24
    r = rows[0]
    for field in ("metrics", "config", "device", "versions", "git", "seconds", "seconds_model", "curve"):
        assert field in r
    assert r["threads"] == torch.get_num_threads()  # the thread count behind every timing
    assert r["n"] == 8 and r["metrics"]["n_labelled"] == 8
    by = {(x["method"], x["setting"], x["domain"]): x for x in rows}
    # source does not depend on the setting; tent in the episodic setting never keeps its updates
    src = {s: by[("source", s, "fog")]["metrics"]["accuracy"] for s in ("continual", "episodic", "mixed")}
    assert len(set(src.values())) == 1
    assert by[("tent", "episodic", "fog")]["config"]["episodic"] is True
    assert by[("tent", "continual", "fog")]["config"]["episodic"] is False
    # reset per shift: the first domain equals continual's first domain (same start, same order)
    first = "foolbox-cifar10"
    assert by[("tent", "reset_per_shift", first)]["metrics"] == by[("tent", "continual", first)]["metrics"]
    again = run_benchmark(parse_spec(spec_values(tiny_weights, cache=tmp_path / "c")), out, progress=False)
    assert again["written"] == 0


def test_interrupted_run_resumes_to_the_uninterrupted_rows(tiny_weights, tmp_path):
    values = spec_values(tiny_weights, kind="test-flaky-foolbox", cache=tmp_path / "c",
                         settings=["continual", "reset_per_shift", "mixed"])
    reference = tmp_path / "reference.jsonl"
    run_benchmark(parse_spec(values), reference, progress=False)

    out = tmp_path / "resumed.jsonl"
    Flaky.budget = 40  # 24 reads per job: dies part way through the second job
    try:
        with pytest.raises(Interrupt):
            run_benchmark(parse_spec(values), out, progress=False)
    finally:
        Flaky.budget = None
    partial = read_rows(out)
    assert 0 < len(partial) < len(read_rows(reference))
    with open(out, "ab") as f:  # and a crash in the middle of writing a row
        f.write(b'{"benchmark": "tiny", "meth')
    with pytest.warns(UserWarning, match="incomplete last line"):
        summary = run_benchmark(parse_spec(values), out, progress=False)
    assert summary["skipped"] == len(partial)
    resumed = read_rows(out)
    assert len(resumed) == len(read_rows(reference))
    assert comparable(resumed) == comparable(read_rows(reference))
    assert out.read_bytes().endswith(b"\n")


def test_store_skips_present_keys_and_writes_whole_lines(tmp_path):
    store = ResultStore(tmp_path / "s.jsonl")
    row = {k: 1 for k in ("benchmark", "method", "config_id", "model", "data_id", "domain", "severity", "setting",
                          "batch_size", "seed")}
    assert store.append(dict(row, metrics={"accuracy": 0.5}))
    assert not store.append(dict(row, metrics={"accuracy": 0.7}))
    assert not ResultStore(tmp_path / "s.jsonl").append(row)
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["metrics"]["accuracy"] == 0.5


def test_limit_and_per_class_change_the_data_key(tiny_weights, tmp_path):
    values = spec_values(tiny_weights, settings=["continual"], methods=["source"])
    values["data"]["per_class"] = 1
    runner = Runner(parse_spec(values), tmp_path / "a.jsonl", limit=4, progress=False)
    runner.run()
    rows = read_rows(tmp_path / "a.jsonl")
    assert {r["n"] for r in rows} == {4} and rows[0]["data"]["limit"] == 4
    other = Runner(parse_spec(values), tmp_path / "a.jsonl", limit=5, progress=False)
    assert other.data_id != runner.data_id


def test_real_imagenet_weights_on_real_images(tmp_path):
    """torchvision's MobileNetV2 (offline package) gets 19 of foolbox's 20 ImageNet images right, as `tta run` does."""
    values = {"name": "mnv2", "model": {"name": "tv:mobilenet_v2@IMAGENET1K_V1"},
              "data": {"kind": "foolbox", "set": "imagenet"}, "methods": ["source"], "batch_size": 10}
    run_benchmark(parse_spec(values), tmp_path / "m.jsonl", progress=False)
    (row,) = read_rows(tmp_path / "m.jsonl")
    assert row["metrics"]["accuracy"] == pytest.approx(0.95) and row["model"] == "tv:mobilenet_v2@IMAGENET1K_V1"


def test_per_domain_models_refuse_continual(tmp_path):
    values = {"name": "z", "model": {"name": "clip:ViT-B-32", "class_names": "data", "input_size": [3, 224, 224]},
              "data": {"kind": "zeroshot", "root": str(tmp_path), "sets": ["food101"]}, "methods": ["source"],
              "settings": ["continual"]}
    with pytest.raises(ValueError, match="episodic or reset_per_shift"):
        run_benchmark(parse_spec(values), tmp_path / "z.jsonl", progress=False)
