"""Tests that try to break the input validation: random shapes, ranks, dtypes, value ranges, NaN/inf,
empty batches and channel counts against ImageModel.forward and several adapters; random config keys and values
against make_config; unknown keys and wrong types at every level of a benchmark file; judge/model class-count
mismatches; missing or broken weight files; unreadable and truncated images.

The rule: either a TypeError/ValueError whose message says what to do, or a finite output of the right shape.
Never an error from deep inside torch, never a silent result for an input that breaks the contract, and an
input that is refused never changes the adapter's state.
"""
import copy
import dataclasses
import re

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tta
from tta.adapter import ADAPTERS, make_config
from tta.bench.runner import plan_jobs
from tta.bench.spec import load_spec, parse_spec

from fixtures import FAST, methods, tiny_judge_folder, tiny_model

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# What every refusal must say: what to pass or how to fix the input.
ACTIONABLE = re.compile(r"must|pass|use |divide|drop|add |resize|write|valid", re.I)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool]


# ---- random inputs ------------------------------------------------------------------------------------------
@st.composite
def image_batches(draw, min_side=0):
    """Mostly plausible image batches with one or more things wrong (or nothing wrong)."""
    rank = draw(st.sampled_from([4, 4, 4, 4, 0, 1, 2, 3, 5]))
    if rank == 4:
        shape = [draw(st.integers(0, 5)), draw(st.sampled_from([3, 3, 3, 1, 2, 4, 0])),
                 draw(st.integers(min_side, 12)), draw(st.integers(min_side, 12))]
        if draw(st.booleans()) and shape[1] == 3:  # channels last
            shape = [shape[0], shape[2], shape[3], 3]
    else:
        shape = draw(st.lists(st.integers(0, 6), min_size=rank, max_size=rank))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 1.0, 1.0, 255.0, 1.5, -1.0, 1e-3]))
    x = torch.rand(tuple(shape), generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))) * scale
    poison = draw(st.sampled_from([None, None, None, float("nan"), float("inf"), -float("inf")]))
    if poison is not None and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = poison
    if dtype in (torch.uint8, torch.int64):
        x = (x.clamp(0, 1) * 255).nan_to_num(0).to(dtype)
    else:
        x = x.to(dtype)
    return x


def satisfies_contract(x, channels=3) -> bool:
    """What the README promises is accepted: float (B, C, H, W) with B, H, W > 0, finite, in [0, 1]."""
    return (x.dim() == 4 and x.numel() > 0 and x.shape[1] == channels and x.is_floating_point()
            and bool(torch.isfinite(x).all()) and float(x.min()) >= -1e-3 and float(x.max()) <= 1 + 1e-3)


def call(fn, x):
    """(output, None) or (None, error); an error that is not a clear TypeError/ValueError fails the test."""
    try:
        return fn(x), None
    except (TypeError, ValueError) as err:
        assert ACTIONABLE.search(str(err)), f"the message does not say what to do: {err}"
        return None, err


def snapshot(adapter):
    state = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    optim = copy.deepcopy(adapter.optimizer.state_dict()) if adapter.optimizer is not None else None
    return state, optim, dict(adapter.guard_events)


def same_state(a, b) -> bool:
    (sa, oa, ga), (sb, ob, gb) = a, b
    if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa) or ga != gb:
        return False
    return repr(oa) == repr(ob)


# ---- ImageModel.forward -------------------------------------------------------------------------------------
@FUZZ
@given(x=image_batches())
def test_image_model_forward_refuses_clearly_or_returns_finite_logits(x):
    model = tiny_model()
    out, err = call(model, x)
    if satisfies_contract(x):
        assert err is None, f"a valid batch {tuple(x.shape)} {x.dtype} was refused: {err}"
        assert out.shape == (x.shape[0], 5) and torch.isfinite(out).all()
    else:
        assert out is None, f"an invalid batch {tuple(x.shape)} {x.dtype} was silently accepted"


def test_image_model_names_the_size_it_was_built_for():
    """A network that cannot take a size (here: two poolings on 1x1 images) gets a message, not a torch crash."""
    model = tta.create_model("zoo:fmnist-cnn")
    with pytest.raises(ValueError, match=r"built for \(28, 28\).*resize"):
        model(torch.rand(2, 1, 1, 1))
    assert model(torch.rand(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float32


# ---- adapters -------------------------------------------------------------------------------------------------
FUZZED_ADAPTERS = methods("baseline")


@pytest.mark.parametrize("name", FUZZED_ADAPTERS)
def test_adapter_refuses_clearly_or_predicts_and_refusals_leave_no_trace(name):
    torch.manual_seed(0)
    adapter = tta.create_adapter(name, tiny_model(sharpness=20.0), **FAST.get(name, {}))

    @settings(max_examples=25 if name != "memo" else 12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(x=image_batches(min_side=8 if name == "cotta" else 2))  # cotta refuses images under 8x8 (its augmentations)
    def check(x):
        before = snapshot(adapter)
        out, err = call(adapter, x)
        if satisfies_contract(x):
            assert err is None, f"{name}: a valid batch {tuple(x.shape)} {x.dtype} was refused: {err}"
            assert out.shape == (x.shape[0], 5) and torch.isfinite(out).all()
        else:
            assert out is None, f"{name}: an invalid batch {tuple(x.shape)} {x.dtype} was silently accepted"
            assert same_state(before, snapshot(adapter)), f"{name}: a refused input changed the adapter's state"

    check()


def test_cotta_on_one_pixel_images():
    adapter = tta.create_adapter("cotta", tiny_model(), n_augmentations=2)
    with pytest.raises(ValueError, match="at least 8x8"):
        adapter(torch.rand(2, 3, 1, 1))


def test_inputs_that_need_grad_or_other_dtypes_are_taken_as_plain_images():
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    for name in ("memo", "tent"):
        out = tta.create_adapter(name, tiny_model(), **FAST.get(name, {}))(x)
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and x.grad is None


# ---- make_config ----------------------------------------------------------------------------------------------
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=6), st.lists(st.integers(0, 5), max_size=3), st.sampled_from(["1e-3", "false"]),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
CONFIG_CLASSES = {n: ADAPTERS.get(n).Config for n in tta.list_adapters()}


@FUZZ
@given(name=st.sampled_from(sorted(CONFIG_CLASSES)), data=st.data())
def test_make_config_refuses_unknown_keys_and_wrong_types_clearly(name, data):
    cls = CONFIG_CLASSES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    key = data.draw(st.one_of(st.sampled_from(fields), st.text(min_size=1, max_size=8)), label="key")
    value = data.draw(VALUES, label="value")
    try:
        cfg = make_config(cls, None, {key: value})
    except TypeError as err:  # unknown keys
        assert key not in fields and "valid keys" in str(err) and repr(key) in str(err)
        return
    except (ValueError, KeyError) as err:  # wrong type or out-of-range value: the message names the field
        assert key in fields
        msg = str(err)
        assert key in msg or "must" in msg or "Valid choices" in msg, f"{key}={value!r}: unclear message {msg!r}"
        return
    assert key in fields
    assert dataclasses.asdict(cfg)[key] == value or isinstance(value, list) or value != value  # lists -> tuples


@pytest.mark.parametrize("key, value, match", [
    ("lr", "1e-3", r"lr must be a number.*write 1\.0e-3"),
    ("episodic", "false", r"episodic must be true or false.*without quotes"),
    ("guard", 0, r"guard must be true or false"),
    ("steps", True, r"steps must be an integer"),
    ("betas", 0.9, r"betas must be a list of 2"),
    ("momentum", [0.9], r"momentum must be a number"),
])
def test_wrong_config_types_name_the_field_and_the_fix(key, value, match):
    with pytest.raises(ValueError, match=match):
        tta.create_adapter("tent", tiny_model(), **{key: value})


# ---- the benchmark file parser ----------------------------------------------------------------------------------
def base_spec():
    return {"name": "fuzz", "model": {"name": "zoo:fmnist-cnn"},
            "data": {"kind": "fashion-mnist", "corruptions": ["fog"], "per_class": 1},
            "settings": ["continual"], "batch_size": 4,
            "methods": ["source", {"name": "tent", "config": {"lr": 1.0e-3},
                                   "model": {"name": "zoo:fmnist-cnn"}}]}


def parse_and_plan(values):
    spec = parse_spec(values, "fuzz.yaml")
    return plan_jobs(spec, spec.methods)  # resolves method configs, as the runner does before running anything


LEVELS = {"top": lambda v: v, "model": lambda v: v["model"], "data": lambda v: v["data"],
          "method": lambda v: v["methods"][1], "method model": lambda v: v["methods"][1]["model"],
          "method config": lambda v: v["methods"][1]["config"]}


def test_the_base_spec_is_valid():
    assert len(parse_and_plan(base_spec())) == 2


@FUZZ
@given(level=st.sampled_from(sorted(LEVELS)), key=st.text(min_size=1, max_size=10))
def test_unknown_keys_at_every_level_are_errors(level, key):
    values = base_spec()
    section = LEVELS[level](values)
    if key in section or key in _valid_keys(level):
        return
    section[key] = 1
    with pytest.raises(ValueError, match=r"unknown (config )?key\(s\).*valid keys"):
        parse_and_plan(values)


def _valid_keys(level):
    from tta.bench.datasets import FashionMNISTConfig
    from tta.bench.spec import BenchmarkSpec, MethodSpec, ModelSpec
    cls = {"top": BenchmarkSpec, "model": ModelSpec, "data": FashionMNISTConfig, "method": MethodSpec,
           "method model": ModelSpec, "method config": ADAPTERS.get("tent").Config}[level]
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("level, key, value, match", [
    ("top", "settings", "continual", "settings must be a list of a string"),
    ("top", "batch_size", "64", "batch_size must be an integer"),
    ("top", "seeds", 0, "seeds must be a list"),
    ("top", "shuffle", "no", "write true or false"),
    ("data", "severities", 5, "severities must be a list"),
    ("data", "per_class", 2.5, "per_class must be an integer"),
    ("model", "kwargs", ["num_classes"], "kwargs must be a mapping"),
    ("method", "config", ["lr"], "config must be a mapping"),
    ("method config", "lr", "1e-3", r"write 1\.0e-3"),
])
def test_wrong_types_in_a_benchmark_file_are_errors(level, key, value, match):
    values = base_spec()
    LEVELS[level](values)[key] = value
    with pytest.raises(ValueError, match=match):
        parse_and_plan(values)


def test_a_key_given_twice_in_a_benchmark_file_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(base_spec(), sort_keys=False) + "batch_size: 8\n")
    with pytest.raises(ValueError, match=r"key 'batch_size' appears twice"):
        load_spec(path)
    with pytest.raises(FileNotFoundError, match="pass a YAML file"):
        load_spec(tmp_path / "missing.yaml")


# ---- judge / model class counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["diffusion_tta", "diffusion_classifier"])
def test_a_judge_of_another_class_count_is_a_clear_error(name):
    model = tiny_model(num_classes=7)  # the tiny judge knows 5 classes
    with pytest.raises(ValueError, match=r"7 classes but the pixel-unet judge knows 5.*use a judge"):
        tta.create_adapter(name, model, judge=tiny_judge_folder())


# ---- missing and broken files -------------------------------------------------------------------------------------
def test_missing_or_broken_weights_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass the path of a \.pth"):
        tta.create_model("timm:test_resnet", weights=tmp_path / "missing.pth", num_classes=10)
    full = tmp_path / "full.pth"
    torch.save(tiny_model().net.state_dict(), full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth.*is the file complete"):
        tta.create_model("timm:test_resnet", weights=truncated, num_classes=10)
    with pytest.raises(ValueError, match="does not fit this architecture.*number of classes"):
        tta.create_model("timm:test_resnet", weights=full, num_classes=10)
    with pytest.raises(FileNotFoundError, match="no diffusion judge folder.*pass an existing folder"):
        tta.create_adapter("diffusion_tta", tiny_model(), judge=str(tmp_path / "no-judge"))
    with pytest.raises(ValueError, match="needs a diffusion judge: pass judge="):
        tta.create_adapter("diffusion_tta", tiny_model())


def test_a_missing_weights_file_for_a_zoo_model_names_that_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt.*does not exist"):
        tta.create_model("zoo:fmnist-cnn", weights=tmp_path / "missing.pt")


def test_cli_missing_weights_exits_2_with_the_message(tmp_path, capsys):
    from tta.cli import main
    rc = main(["run", "--model", "timm:test_resnet", "--weights", str(tmp_path / "nope.pth"), "--method", "source",
               "--data", str(tmp_path), "--device", "cpu"])
    assert rc == 2 and "nope.pth" in capsys.readouterr().err


# ---- unreadable and truncated images ------------------------------------------------------------------------------
@pytest.fixture
def image_folder_with_bad_files(tmp_path):
    from PIL import Image
    root = tmp_path / "images"
    good = []
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            path = root / label / f"img{i}.png"
            Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(path)
            good.append(path)
    truncated = root / "0" / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    garbage = root / "1" / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    return root, {str(truncated), str(garbage)}


def test_unreadable_images_stop_the_run_naming_the_file(image_folder_with_bad_files):
    from tta.data.images import open_images
    root, bad = image_folder_with_bad_files
    ds = open_images(str(root), (3, 16, 16))
    with pytest.raises(ValueError, match=r"cannot read image .*(truncated\.png|garbage\.jpg).*on_error='skip'"):
        for i in range(len(ds)):
            ds[i]


def test_unreadable_images_are_skipped_and_counted_once(image_folder_with_bad_files):
    from tta.data.images import open_images
    root, bad = image_folder_with_bad_files
    ds = open_images(str(root), (3, 16, 16), on_error="skip")
    assert len(ds) == 6 and set(ds.skipped) == bad and len(ds.skipped) == 2
    paths = [str(p) for p, _ in ds.items]
    assert len(set(paths)) == 6 and not bad & set(paths)  # no image stands in twice for a skipped one
    for _ in range(2):  # reading twice (one pass per method) neither re-counts nor duplicates
        assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))
    assert len(ds.skipped) == 2


def test_cli_on_error(image_folder_with_bad_files, capsys):
    from tta.cli import main
    root, bad = image_folder_with_bad_files
    args = ["run", "--model", "zoo:fmnist-cnn", "--method", "norm", "--data", str(root), "--device", "cpu",
            "--batch-size", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and ("truncated.png" in err or "garbage.jpg" in err)
    assert main(args + ["--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "(6 images" in out and "skipped 2 unreadable file(s)" in out
