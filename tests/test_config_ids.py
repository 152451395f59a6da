"""Result ids are stable under adding config fields: a field added with a default (entered in ADDED_FIELDS) leaves
the id of every row made before it as it was, so resuming finds those rows instead of computing them again."""
import dataclasses
import json
from pathlib import Path

import pytest

from tta.adapter import ADAPTERS
from tta.bench.datasets import DATA_KINDS
from tta.bench.results import ADDED_FIELDS, config_id
from tta.bench.runner import Runner, plan_jobs
from tta.bench.spec import load_spec

# Every config field as ids were frozen (method configs, and the data descriptor of each data kind), under its current
# name: a field renamed since is hashed under its old name (tta.bench.results.RENAMED_FIELDS), so its ids stay.
FROZEN = json.loads((Path(__file__).parent / "config_fields_frozen.json").read_text())


def test_adding_a_field_with_its_default_leaves_existing_ids_unchanged(monkeypatch, tmp_path):
    spec = load_spec("quick")
    jobs = plan_jobs(spec, spec.methods)
    before = [j.config_id for j in jobs]
    data_before = Runner(spec, tmp_path / "r.jsonl", progress=False, device="cpu").data_id

    # A new field, as a later release would add it: tent's Config with `warmup_steps: int = 0`.
    tent = ADAPTERS.get("tent").Config
    newer = dataclasses.make_dataclass("Config", [("warmup_steps", int, dataclasses.field(default=0))], bases=(tent,))
    config = dataclasses.asdict(newer(**{f.name: getattr(tent(), f.name) for f in dataclasses.fields(tent)}))
    old = dataclasses.asdict(tent())
    assert config_id(config, ("adapter", "adapter:tent")) != config_id(old, ("adapter", "adapter:tent"))  # unlisted

    # (added to the entries already listed, which the quick suite's ids rely on too)
    for scope, added in (("adapter:tent", {"warmup_steps": 0}),
                         ("adapter", {"grad_clip": None}),     # a field of every method's config
                         ("data", {"jitter": 0.0})):           # and one of every data kind
        monkeypatch.setitem(ADDED_FIELDS, scope, {**ADDED_FIELDS.get(scope, {}), **added})
    assert config_id(config, ("adapter", "adapter:tent")) == config_id(old, ("adapter", "adapter:tent"))
    # every job of the quick suite, with the new fields at their defaults: the ids of its committed rows
    for job, id_ in zip(jobs, before):
        job.config = dict(job.config, grad_clip=None, **({"warmup_steps": 0} if job.method.name == "tent" else {}))
        assert job.config_id == id_
    data = dict(Runner(spec, tmp_path / "r.jsonl", progress=False, device="cpu").data, jitter=0.0)
    assert f"{spec.data.kind}:{config_id(data, ('data', 'data:fashion-mnist'))}" == data_before
    # a row that used another value is another row
    assert config_id(dict(config, warmup_steps=5), ("adapter", "adapter:tent")) != config_id(old, ("adapter",
                                                                                                   "adapter:tent"))
    # only the listed scopes apply: eata's config has no warmup_steps entry
    assert config_id({"warmup_steps": 0}, ("adapter:eata",)) != config_id({}, ("adapter:eata",))


def _ours(obj) -> bool:
    """Registered by the package, not by a test module (tests register throwaway kinds)."""
    return (getattr(obj, "__module__", "") or "").startswith("tta.")


def current_fields():
    fields = {}
    for name in ADAPTERS.names():
        if _ours(ADAPTERS.get(name)):
            fields[f"adapter:{name}"] = {f.name for f in dataclasses.fields(ADAPTERS.get(name).Config)}
    for kind in DATA_KINDS.names():
        if _ours(DATA_KINDS.get(kind).build):
            names = {f.name for f in dataclasses.fields(DATA_KINDS.get(kind).config)}
            fields[f"data:{kind}"] = names - {"root", "cache"} | {"limit"}  # as tta.bench.runner.data_descriptor
    return fields


@pytest.mark.parametrize("scope", sorted(current_fields()))
def test_every_config_field_is_frozen_or_listed_as_added(scope):
    general = scope.split(":")[0]
    listed = set(ADDED_FIELDS.get(general, {})) | set(ADDED_FIELDS.get(scope, {}))
    fields = current_fields()[scope]
    if scope not in FROZEN:
        pytest.fail(f"{scope} is new: add its fields to tests/config_fields_frozen.json as it is released: "
                    f'"{scope}": {json.dumps(sorted(fields))}')
    new = sorted(fields - set(FROZEN[scope]) - listed)
    assert not new, (f"{scope}: field(s) {new} are new; enter each in tta.bench.results.ADDED_FIELDS under "
                     f"{scope!r} (or {general!r}) with the value rows made before it used, so their ids stay as "
                     "they are")
    gone = sorted(set(FROZEN[scope]) - fields)
    assert not gone, (f"{scope}: field(s) {gone} were removed, which changes the id of every row of this scope; keep "
                      "them, or recompute the committed rows and update tests/config_fields_frozen.json")
