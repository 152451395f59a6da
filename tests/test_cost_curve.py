"""benchmarks/cost_curve.py: every (pairs, steps) setting paired with the source on the same images."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("cost_curve", ROOT / "benchmarks" / "cost_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, domain, severity, correct, config):
    ids = list(range(len(correct)))
    return {"benchmark": "curve", "model": "zoo:fmnist-cnn", "data_id": "d", "batch_size": 1,
            "config_id": json.dumps(config, sort_keys=True),
            "method": method, "domain": domain, "severity": severity, "seed": 0, "setting": "episodic",
            "config": config, "n": len(correct), "seconds": 0.5 * len(correct), "primary_metric": "accuracy",
            "metrics": {"accuracy": sum(correct) / len(correct)}, "per_image": {"id": ids, "correct": correct}}


def test_gain_and_cost_per_setting(tmp_path):
    source = [0] * 30 + [1] * 10
    better = [1] * 30 + [1] * 10          # 30 images fixed, none broken: a significant gain
    same = list(source)
    rows = [row("source", d, s, source, {"steps": 1}) for d, s in (("clean", None), ("noise", 5))]
    rows += [row("dtta-8x1", d, s, same, {"pairs": 8, "steps": 1}) for d, s in (("clean", None), ("noise", 5))]
    rows += [row("dtta-32x5", "clean", None, same, {"pairs": 32, "steps": 5}),
             row("dtta-32x5", "noise", 5, better, {"pairs": 32, "steps": 5})]
    path = tmp_path / "curve.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = load_script()
    points = script.curve(script.load_results([path]))
    assert [(p[0], p[1]) for p in points] == [("dtta-8x1", 8), ("dtta-32x5", 160)]
    cheap, costly = points
    assert cheap[3].delta == 0 and cheap[3].verdict() == "no significant change"
    assert costly[3].delta == pytest.approx(0.75) and costly[3].verdict() == "beats"
    assert costly[4].delta == 0  # clean unchanged
    script.main([str(path)])
    table = (tmp_path / "curve-gain.md").read_text()
    assert "| dtta-32x5 | 160 | 0.50 | +75.0" in table and "beats" in table
    assert (tmp_path / "curve-gain.png").stat().st_size > 0


def test_needs_source_rows(tmp_path):
    path = tmp_path / "curve.jsonl"
    path.write_text(json.dumps(row("dtta-8x1", "noise", 5, [1, 0], {"pairs": 8, "steps": 1})) + "\n")
    script = load_script()
    with pytest.raises(SystemExit, match="no 'source' rows"):
        script.curve(script.load_results([path]))
