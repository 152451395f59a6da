"""record_steps: each image's prediction after 0, 1, ..., N Diffusion-TTA steps, stored with the rows and reported.

The oracle: with the same draws (here one image and a seed) the first k steps of an N-step run are a k-step
run, so what an N-step run records after k steps must equal the prediction of a separate k-step run, for every k."""
import pytest
import torch

from fixtures import save_pixel_judge, tiny_judge_folder, tiny_model
from tta import create_adapter
from tta.bench.report import write_report
from tta.bench.results import read_rows
from tta.bench.runner import run_benchmark
from tta.bench.spec import parse_spec
from tta.bench.step_report import at_step, recorded_steps

CONFIG = {"judge": None, "preset": "classifier-only", "adapt": "all", "pairs": 4, "micro_batch": 4, "seed": 3,
          "lr": 0.5}


def _adapter(steps):
    torch.manual_seed(1)
    return create_adapter("diffusion_tta", tiny_model(sharpness=2.0), **{**CONFIG, "judge": tiny_judge_folder(),
                                                                         "steps": steps})


def test_what_an_n_step_run_records_after_k_steps_is_a_k_step_run():
    x = torch.rand(1, 3, 16, 16)
    recorder = _adapter(3)
    recorder.outputs_by_step = []
    final = recorder(x)
    log = recorder.outputs_by_step
    assert len(log) == 4 and torch.equal(log[-1], final)
    for k in range(4):
        alone = _adapter(k)(x)
        torch.testing.assert_close(log[k], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(log[0], log[3])  # the steps moved the prediction: the check above can fail
    # nothing is recorded unless asked for
    quiet = _adapter(2)
    quiet(x)
    assert quiet.outputs_by_step is None


def _spec(weights, judge, **method):
    return parse_spec({
        "name": "steps", "batch_size": 1, "settings": ["episodic"],
        "model": {"name": "timm:test_resnet", "weights": str(weights), "input_size": [3, 32, 32],
                  "kwargs": {"num_classes": 10}},
        "data": {"kind": "foolbox", "set": "cifar10", "corruptions": ["fog"], "severities": [5], "clean": True,
                 "max_images": 4},
        "methods": ["source", {"name": "diffusion_tta", "label": "dtta",
                               "config": {**CONFIG, "judge": str(judge), "steps": 2}, **method}]})


def test_the_runner_stores_every_step_and_the_report_pairs_each_with_step_0(tiny_weights, tmp_path):
    judge = save_pixel_judge(tmp_path / "judge", num_classes=10, size=16)
    plain, recorded = tmp_path / "plain.jsonl", tmp_path / "recorded.jsonl"
    run_benchmark(_spec(tiny_weights, judge), plain, progress=False)
    run_benchmark(_spec(tiny_weights, judge, record_steps=True), recorded, progress=False)
    source = {r["domain"]: r for r in read_rows(recorded) if r["method"] == "source"}
    mine = [r for r in read_rows(recorded) if r["method"] == "dtta"]
    other = [r for r in read_rows(plain) if r["method"] == "dtta"]
    assert recorded_steps(mine) == 2 and recorded_steps(other) is None
    for r, p in zip(mine, other):
        assert r["config_id"] == p["config_id"] and r["metrics"] == p["metrics"]  # recording changes no result
        records = r["per_image"]
        assert [s[-1] for s in records["step_correct"]] == records["correct"]
        assert [s[-1] for s in records["step_pred"]] == records["pred"]
        assert [s[0] for s in records["step_pred"]] == source[r["domain"]]["per_image"]["pred"]  # step 0: unadapted
        assert at_step(r, 2)["metrics"] == {"accuracy": r["metrics"]["accuracy"]}
    made = write_report([recorded], plots=True)
    assert [p.name for p in made["plots"] if p.name.endswith("-by-step.png")] == ["recorded-0-episodic-by-step.png"]
    md = made["markdown"][0].read_text()
    assert "![recorded-0-episodic-by-step](recorded-0-episodic-by-step.png)" in md
    assert "**dtta: accuracy after each step**" in md
    table = md.split("**dtta: accuracy after each step**")[1]
    assert "| 0 | " in table and "| 2 | " in table and "+0.0 [+0.0, +0.0], 0/0, p = 1" in table


@pytest.mark.parametrize("method, error", [
    ({"name": "tent", "record_steps": True}, "does not"),
    ({"name": "diffusion_tta", "record_steps": "yes"}, "true or false"),
    ({"name": "diffusion_tta", "record_steps": True, "settings": ["mixed"]}, "mixed"),
])
def test_record_steps_refuses_what_it_cannot_record(tiny_weights, tmp_path, method, error):
    judge = save_pixel_judge(tmp_path / "judge", num_classes=10, size=16)
    method = {**method, "config": {**CONFIG, "judge": str(judge), "steps": 1}} if method["name"] != "tent" else method
    values = {"name": "x", "batch_size": 1, "settings": ["episodic"],
              "model": {"name": "timm:test_resnet", "weights": str(tiny_weights), "input_size": [3, 32, 32],
                        "kwargs": {"num_classes": 10}},
              "data": {"kind": "foolbox", "set": "cifar10", "max_images": 2}, "methods": [method]}
    with pytest.raises(ValueError, match=error):
        run_benchmark(parse_spec(values), tmp_path / "r.jsonl", progress=False)
    assert not (tmp_path / "r.jsonl").exists() or not read_rows(tmp_path / "r.jsonl")
