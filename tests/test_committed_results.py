"""The committed results are the rows their spec would key today: a fresh clone's `tta bench <spec>` compares its
rows with them key by key, `--out results/<name>.jsonl` finds every row already present instead of recomputing it
under a new id, and reports never show one method twice."""
from pathlib import Path

import pytest

from tta.bench.results import read_rows
from tta.bench.runner import plan_jobs
from tta.bench.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("benchmarks/quick.yaml", "results/quick.jsonl"),
         ("tta/bench/specs/quick-scenes.yaml", "results/quick-scenes.jsonl"),
         ("benchmarks/evidence.yaml", "results/evidence.jsonl"),
         ("benchmarks/evidence-heldout.yaml", "results/evidence-heldout.jsonl"),
         ("benchmarks/dtta-cost-curve.yaml", "results/dtta-cost-curve.jsonl")]


@pytest.mark.parametrize("spec_path,results_path", PAIRS)
def test_committed_rows_match_their_spec(spec_path, results_path):
    spec = load_spec(ROOT / spec_path)
    expected = {(j.method.label, j.setting, j.seed): j.config_id for j in plan_jobs(spec, spec.methods)}
    stale = sorted({r["method"] for r in read_rows(ROOT / results_path)
                    if expected.get((r["method"], r["setting"], r["seed"])) != r["config_id"]})
    assert not stale, (f"{results_path}: rows of {stale} were made with another config than {spec_path} resolves "
                       "to today; rerun those methods with the current code and replace their rows")


@pytest.mark.parametrize("spec_path,results_path", PAIRS)
def test_committed_rows_carry_the_model_and_data_keys_of_their_spec(spec_path, results_path, tmp_path):
    """The rest of the key: a fresh clone resumes from these rows only if the model and data parts match too."""
    from tta.bench.runner import Runner
    spec = load_spec(ROOT / spec_path)
    runner = Runner(spec, tmp_path / "unused.jsonl", progress=False, device="cpu")
    fields = ("config_id", "model", "data_id", "batch_size")
    expected = {(j.method.label, j.setting, j.seed): [runner.job_key(j)[f] for f in fields] for j in runner.jobs}
    stale = sorted({r["method"] for r in read_rows(ROOT / results_path)
                    if expected.get((r["method"], r["setting"], r["seed"])) != [r[f] for f in fields]})
    assert not stale, f"{results_path}: rows of {stale} are keyed with another model, batch size or data"
