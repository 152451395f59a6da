"""The diffusion model that gives feedback is the judge; it was once called the backend. The old config field names
(`backend`, `adapt_backend`, `backend_lr`) are still accepted and mean the new ones, giving both names of one field is
refused, the old Python names are aliases of the new objects, and result ids do not depend on which names a config
was written with, so committed rows keep their ids and a rerun skips them."""
import dataclasses
import json
from pathlib import Path

import pytest

import tta
import tta.generative
import tta.generative.base
import tta.generative.dit
import tta.generative.loading
import tta.generative.map_unet
import tta.generative.pixel_unet
import tta.generative.stable_diffusion
from tta.bench.results import RENAMED_FIELDS, config_id, read_rows
from tta.bench.runner import plan_jobs
from tta.bench.spec import MethodSpec, load_spec
from tta.config import OLD_FIELD_NAMES, make_config
from tta.generative.classifier import DiffusionClassifier
from tta.methods.diffusion_classifier import DiffusionClassifierConfig
from tta.methods.diffusion_tta import DiffusionTTA, DiffusionTTAConfig
from tta.methods.judged import JudgedAdapter

from fixtures import save_pixel_judge, tiny_model

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "results" / "evidence.jsonl"
FAST = {"pairs": 6, "micro_batch": 4, "steps": 1}
OLD = {"backend": "pixel-unet:/judge", "adapt_backend": True, "backend_lr": 0.25}
NEW = {"judge": "pixel-unet:/judge", "adapt_judge": True, "judge_lr": 0.25}


@pytest.fixture(scope="module")
def pixel_judge(tmp_path_factory):
    return save_pixel_judge(tmp_path_factory.mktemp("pixel") / "judge", num_classes=5, size=16)


# ---- config fields ------------------------------------------------------------------------------------------
def test_the_old_field_names_mean_the_new_ones():
    for given in (dict(cfg=OLD), dict(overrides=OLD), dict(cfg={"backend": "a", "lr": 0.5}, overrides=OLD)):
        config = make_config(DiffusionTTAConfig, given.get("cfg"), given.get("overrides"))
        assert (config.judge, config.adapt_judge, config.judge_lr) == ("pixel-unet:/judge", True, 0.25)
    assert make_config(DiffusionTTAConfig, None, OLD) == make_config(DiffusionTTAConfig, None, NEW)
    assert make_config(DiffusionClassifierConfig, None, {"backend": "x"}).judge == "x"
    # an old name of a field the config does not have stays an unknown key, named as given
    with pytest.raises(TypeError, match="unknown config key.*'backend'"):
        make_config(tta.adapter.ADAPTERS.get("tent").Config, None, {"backend": "x"})
    # a benchmark file's `config:` (and `tta run --set`, which goes through make_config too)
    assert MethodSpec("diffusion_tta", config=dict(OLD)).resolved_config() == \
        MethodSpec("diffusion_tta", config=dict(NEW)).resolved_config()


def test_a_benchmark_file_with_the_old_names_plans_the_same_jobs(tmp_path):
    text = (ROOT / "benchmarks" / "evidence.yaml").read_text()
    assert "judge:" in text and "backend" not in text
    old = tmp_path / "evidence.yaml"
    old.write_text(text.replace("adapt_judge:", "adapt_backend:").replace("{judge:", "{backend:")
                   .replace("judge_lr:", "backend_lr:"))
    assert "backend:" in old.read_text()
    new_spec, old_spec = load_spec(ROOT / "benchmarks" / "evidence.yaml"), load_spec(old)
    new_jobs, old_jobs = plan_jobs(new_spec, new_spec.methods), plan_jobs(old_spec, old_spec.methods)
    assert [(j.config, j.config_id) for j in new_jobs] == [(j.config, j.config_id) for j in old_jobs]


def test_both_names_of_one_field_are_refused(pixel_judge):
    for cfg, overrides in ((None, {"backend": "a", "judge": "b"}), ({"adapt_backend": True, "adapt_judge": True}, {}),
                           (None, {"backend_lr": 0.1, "judge_lr": 0.1})):
        with pytest.raises(TypeError, match="old name of .*give only"):
            make_config(DiffusionTTAConfig, cfg, overrides)
    with pytest.raises(ValueError, match="method dtta: .*'backend' is the old name of 'judge'"):
        MethodSpec("diffusion_tta", label="dtta", config={"backend": "a", "judge": "b"}).resolved_config()
    with pytest.raises(TypeError, match="'backend' is the old name of 'judge'"):
        tta.create_adapter("diffusion_tta", tiny_model(), judge=pixel_judge, backend=pixel_judge, **FAST)
    # but a config instance (all its fields, new names) with an old-named keyword is no conflict: the keyword wins
    base = make_config(DiffusionTTAConfig, None, {"judge": "a"})
    assert make_config(DiffusionTTAConfig, base, {"backend": "b"}).judge == "b"


def test_the_old_keyword_takes_a_judge_object_or_string(pixel_judge):
    by_string = tta.create_adapter("diffusion_tta", tiny_model(), backend=pixel_judge, adapt_backend=True,
                                   backend_lr=0.5, **FAST)
    assert by_string.cfg.judge == pixel_judge and by_string.cfg.adapt_judge and by_string.cfg.judge_lr == 0.5
    judge = tta.create_judge(pixel_judge)
    by_object = tta.create_adapter("diffusion_tta", tiny_model(), backend=judge, **FAST)
    assert by_object.judge is judge and by_object.backend is judge  # the old attribute too
    assert by_object.cfg.judge == f"pixel-unet:{pixel_judge}"
    names = list(by_object.state_dict())
    assert any(n.startswith("judge.") for n in names) and not any(n.startswith("backend.") for n in names)
    classifier = DiffusionClassifier(judge, samples=(4,))
    assert classifier.backend is classifier.judge is judge


# ---- Python names ---------------------------------------------------------------------------------------------
ALIASES = [
    (tta, "create_backend", "create_judge"), (tta, "list_backends", "list_judges"),
    (tta.generative, "create_backend", "create_judge"), (tta.generative, "list_backends", "list_judges"),
    (tta.generative, "BACKENDS", "JUDGES"), (tta.generative, "register_backend", "register_judge"),
    (tta.generative, "DiffusionBackend", "DiffusionJudge"), (tta.generative, "PixelUNetBackend", "PixelUNetJudge"),
    (tta.generative, "MapUNetBackend", "MapUNetJudge"), (tta.generative, "DiTBackend", "DiTJudge"),
    (tta.generative, "StableDiffusionBackend", "StableDiffusionJudge"),
    (tta.generative.base, "BACKENDS", "JUDGES"), (tta.generative.base, "DiffusionBackend", "DiffusionJudge"),
    (tta.generative.base, "register_backend", "register_judge"),
    (tta.generative.loading, "create_backend", "create_judge"),
    (tta.generative.loading, "list_backends", "list_judges"),
    (tta.generative.loading, "resolve_backend", "resolve_judge"),
    (tta.generative.loading, "match_backend_to_model", "match_judge_to_model"),
    (tta.generative.pixel_unet, "PixelUNetBackend", "PixelUNetJudge"),
    (tta.generative.map_unet, "MapUNetBackend", "MapUNetJudge"),
    (tta.generative.dit, "DiTBackend", "DiTJudge"),
    (tta.generative.stable_diffusion, "StableDiffusionBackend", "StableDiffusionJudge"),
]


@pytest.mark.parametrize("module, old, new", ALIASES, ids=[f"{m.__name__}.{o}" for m, o, _ in ALIASES])
def test_the_old_python_names_are_the_new_objects(module, old, new):
    assert getattr(module, old) is getattr(module, new)


def test_judge_kinds_keep_their_registry_names():
    assert {"pixel-unet", "map-unet", "dit", "sd"} <= set(tta.list_judges())
    assert tta.list_judges() == tta.list_backends()
    assert DiffusionTTA.backend is JudgedAdapter.judge


# ---- result ids -------------------------------------------------------------------------------------------------
def test_the_rename_tables_agree():
    # RENAMED_FIELDS is derived from OLD_FIELD_NAMES; it is only right while no two old names share a new one
    assert len(set(OLD_FIELD_NAMES.values())) == len(OLD_FIELD_NAMES)
    assert RENAMED_FIELDS["adapter"] == {"judge": "backend", "adapt_judge": "adapt_backend", "judge_lr": "backend_lr"}
    for cls in (DiffusionTTAConfig, DiffusionClassifierConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert not fields & set(OLD_FIELD_NAMES)


def test_an_id_does_not_depend_on_the_names_a_config_was_written_with():
    config = dataclasses.asdict(make_config(DiffusionTTAConfig, None, NEW))
    old = {RENAMED_FIELDS["adapter"].get(k, k): v for k, v in config.items()}
    assert "backend" in old and "judge" not in old
    scopes = ("adapter", "adapter:diffusion_tta")
    assert config_id(config, scopes) == config_id(old, scopes)
    assert config_id(dict(config, judge="other"), scopes) != config_id(config, scopes)
    # the renames are scoped: a model or data descriptor with a `judge` key hashes as it is
    assert config_id({"judge": 1}) != config_id({"backend": 1})


def _committed_rows():
    """Rows of results/evidence.jsonl as stored (old field names), one per adapter holding a judge."""
    rows = {}
    for line in EVIDENCE.read_text().splitlines():
        row = json.loads(line)
        if "backend" in row.get("config", {}) and row["adapter"] not in rows:
            if row["adapter"] == "diffusion_classifier" or "backend_lr" in row["config"]:
                rows[row["adapter"]] = row
    assert set(rows) == {"diffusion_tta", "diffusion_classifier"}
    return list(rows.values())


@pytest.mark.parametrize("row", _committed_rows(), ids=lambda r: r["method"])
def test_a_committed_row_keeps_its_id(row):
    stored = row["config"]
    assert not set(stored) & set(RENAMED_FIELDS["adapter"])  # written before the rename
    scopes = ("adapter", f"adapter:{row['adapter']}")
    assert config_id(stored, scopes) == row["config_id"]
    # its config rebuilt as the runner builds it, from the new names and from the old ones
    overrides = {k: v for k, v in stored.items() if k != "episodic"}
    for given in ({OLD_FIELD_NAMES.get(k, k): v for k, v in overrides.items()}, overrides):
        config = dataclasses.replace(MethodSpec(row["adapter"], config=given).resolved_config(),
                                     episodic=row["setting"] == "episodic")
        assert "judge" in dataclasses.asdict(config)
        assert config_id(dataclasses.asdict(config), scopes) == row["config_id"]
    # and the committed spec (now written with the new names) plans the same id, so a rerun skips the row
    spec = load_spec(ROOT / "benchmarks" / "evidence.yaml")
    jobs = [j for j in plan_jobs(spec, spec.methods) if j.method.label == row["method"]
            and j.setting == row["setting"] and j.seed == row["seed"]]
    assert [j.config_id for j in jobs] == [row["config_id"]]


def test_committed_rows_read_with_the_new_names():
    rows = [r for r in read_rows(EVIDENCE) if r["adapter"] in ("diffusion_tta", "diffusion_classifier")]
    assert rows and all("judge" in r["config"] and "backend" not in r["config"] for r in rows)
    assert all(config_id(r["config"], ("adapter", f"adapter:{r['adapter']}")) == r["config_id"] for r in rows)
