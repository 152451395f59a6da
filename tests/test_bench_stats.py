"""Paired statistics in reports: the exact sign/McNemar test and the stratified bootstrap against independent
references, per-image records from real runs, and verdicts that claim a difference only when it is significant."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from tta.bench.report import Group, write_report
from tta.bench.stats import compare_rows, sign_test_p, stratified_bootstrap_ci


@pytest.mark.parametrize("wins,losses", [(0, 0), (0, 5), (1, 9), (5, 5), (3, 17), (40, 60), (0, 200)])
def test_sign_test_equals_scipys_exact_binomial_test(wins, losses):
    expected = 1.0 if wins + losses == 0 else scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
    assert sign_test_p(wins, losses) == pytest.approx(expected, rel=1e-9)


def test_bootstrap_interval_collapses_on_constant_differences_and_matches_the_normal_width():
    assert stratified_bootstrap_ci([np.full(50, 0.25), np.full(10, -0.25)]) == pytest.approx((0.0, 0.0), abs=1e-12)
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.2, 0.5, 0.3])
    lo, hi = stratified_bootstrap_ci([d])
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - half, abs=0.01) and hi == pytest.approx(d.mean() + half, abs=0.01)


def row(method, domain, correct, severity=5, ids=None, adapter=None):
    ids = list(range(len(correct))) if ids is None else ids
    acc = sum(correct) / len(correct)
    return {"benchmark": "b", "model": "m", "data_id": "d", "setting": "episodic", "method": method,
            "adapter": adapter or method, "config_id": "c" * 12, "domain": domain, "severity": severity, "seed": 0,
            "task": "classification", "primary_metric": "accuracy", "n": len(correct), "batch_size": 1,
            "seconds_model": 1.0, "metrics": {"accuracy": acc, "error": 1 - acc},
            "per_image": {"id": ids, "pred": [0] * len(correct), "correct": list(correct)}}


def test_compare_pairs_images_by_id_and_counts_discordant_pairs():
    src = [row("source", "fog", [1, 0, 0, 1, 0]), row("source", "snow", [0, 0, 1, 1])]
    # ids in another order: pairing is by id, not by position
    new = [row("x", "fog", [1, 1, 0, 1, 0][::-1], ids=[4, 3, 2, 1, 0]), row("x", "snow", [1, 1, 1, 0])]
    cmp = compare_rows(new, src, "accuracy")
    assert (cmp.n, cmp.domains, cmp.wins, cmp.losses) == (9, 2, 3, 1)
    assert cmp.delta == pytest.approx(((0.6 - 0.4) + (0.75 - 0.5)) / 2)
    assert cmp.p == pytest.approx(scipy_stats.binomtest(3, 4, 0.5).pvalue)
    assert cmp.verdict() == "no significant change"
    assert compare_rows(new, src[:1], "accuracy") is None  # snow has no reference: not the same images


def test_report_claims_a_change_only_when_it_is_significant(tmp_path):
    base = [1] * 10 + [0] * 10
    one_better = [1] * 11 + [0] * 9              # +5 points on 20 images: one discordant pair, p = 1
    many_better = [1] * 10 + [1] * 9 + [0]       # 9 wins, 0 losses: p = 0.0039
    rows = [row("source", "fog", base), row("a", "fog", one_better), row("b", "fog", many_better),
            row("source", "clean", base, severity=None), row("a", "clean", base, severity=None),
            row("b", "clean", base, severity=None)]
    lines = Group(("b", "m", "d", "episodic"), rows).summary("accuracy")
    a, b = (next(x for x in lines if f"**{m}**" in x) for m in "ab")
    assert "+5.0 points" in a and "**no significant change**" in a and "beats" not in a
    assert "**beats**" in b and "9 better / 0 worse" in b and "p = 0.0039" in b
    assert "clean (1 domain, 20 images) 50.0 vs 50.0" in b


def test_rows_without_per_image_records_are_reported_but_not_tested():
    old = [row("source", "fog", [1, 0, 0, 0]), row("a", "fog", [1, 1, 1, 1])]
    for r in old:
        del r["per_image"]
    (line,) = Group(("b", "m", "d", "episodic"), old).summary("accuracy")
    assert "not tested" in line and "beats" not in line and "+75.0 points" in line


def test_runs_store_per_image_records_that_pair_in_the_report(tmp_path):
    import timm
    import torch
    from tta.bench.results import read_rows
    from tta.bench.runner import run_benchmark
    from tta.bench.spec import parse_spec
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=10).state_dict(), weights)
    spec = parse_spec({
        "name": "tiny", "batch_size": 4,
        "model": {"name": "timm:test_resnet", "weights": str(weights), "input_size": [3, 32, 32],
                  "kwargs": {"num_classes": 10}},
        "data": {"kind": "foolbox", "set": "cifar10", "corruptions": ["fog"], "severities": [5], "clean": True,
                 "max_images": 10},
        "settings": ["episodic", "mixed"], "methods": ["source", "norm"]})
    out = tmp_path / "r.jsonl"
    run_benchmark(spec, out, progress=False)
    rows = read_rows(out)
    for r in rows:
        rec = r["per_image"]
        assert sorted(rec["id"]) == list(range(10))  # every image once, by its index in the domain
        assert sum(rec["correct"]) == round(r["metrics"]["accuracy"] * 10)
    md = write_report([out], plots=False)["markdown"][0].read_text()
    assert md.count("**norm** accuracy against source: on corrupted domains (1 domain, 10 images)") == 2
    assert "not tested" not in md


def test_evaluation_and_held_out_parts_are_disjoint_halves_of_every_class():
    from tta.bench.datasets import half_of_each_class
    labels = [i % 3 for i in range(31)]
    ev, ho = half_of_each_class(labels, "evaluation", 0), half_of_each_class(labels, "held_out", 0)
    assert not set(ev) & set(ho) and sorted(ev + ho) == list(range(31))
    for c in range(3):
        n = labels.count(c)
        assert sum(labels[i] == c for i in ev) == -(-n // 2)
    assert half_of_each_class(labels, "evaluation", 1) != ev  # seeded
    with pytest.raises(ValueError, match="evaluation, held_out"):
        half_of_each_class(labels, "test", 0)


def test_the_evidence_specs_never_share_images_or_corruptions():
    from pathlib import Path
    from tta.bench.spec import load_spec
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    report, held = load_spec(root / "evidence.yaml"), load_spec(root / "evidence-heldout.yaml")
    assert (report.data.part, held.data.part) == ("evaluation", "held_out")
    assert report.data.subsample_seed == held.data.subsample_seed
    assert not set(report.data.corruption_list()) & set(held.data.corruption_list())
    assert len(report.data.corruption_list()) >= 6 and report.data.per_class * 10 >= 200


def test_reports_state_the_command_that_made_them(tmp_path):
    from tta.cli import main
    out = tmp_path / "r.jsonl"
    from tta.bench.results import append_row
    for r in (row("source", "fog", [1, 0]), row("a", "fog", [1, 1])):
        append_row(out, r)
    assert main(["report", str(out), "--no-plots"]) == 0
    assert f"Command: `tta report {out} --no-plots`" in (tmp_path / "r.md").read_text()


def test_the_replication_sees_none_of_the_evidence_images():
    from pathlib import Path
    from tta.bench.datasets import BuildContext, build_domains
    from tta.bench.spec import load_spec
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    first, again = load_spec(root / "evidence.yaml"), load_spec(root / "evidence-replication.yaml")
    for spec in (first, again):
        spec.data.corruptions, spec.data.cache = None, None  # the clean domain holds the same images as every other
    ctx = BuildContext(input_size=(1, 28, 28))
    (a,), (b,) = build_domains(first.data, ctx), build_domains(again.data, ctx)
    a_idx, b_idx = list(a.dataset.indices), list(b.dataset.indices)
    assert len(a_idx) == len(b_idx) == 200 and not set(a_idx) & set(b_idx)
    labels = a.dataset.dataset.targets
    assert all(sum(int(labels[i]) == c for i in b_idx) == 20 for c in range(10))
    assert {k: v for k, v in vars(first.data).items() if k != "exclude_per_class"} == \
        {k: v for k, v in vars(again.data).items() if k != "exclude_per_class"}


def test_exclude_per_class_refuses_what_is_not_a_count():
    from tta.bench.datasets import BuildContext, build_domains, parse_data_config
    cfg = parse_data_config({"kind": "fashion-mnist", "part": "evaluation", "per_class": 2, "exclude_per_class": 0})
    with pytest.raises(ValueError, match="exclude_per_class must be a positive integer"):
        build_domains(cfg, BuildContext(input_size=(1, 28, 28)))
