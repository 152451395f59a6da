"""Every numeric config field declares its range (tta.config), and a value outside it is refused when the config is
built, whichever way it is built, with a message naming the field, the value and the range; counts that set the
work of a call are bounded, so a typo such as 10**9 is refused at once instead of hanging or allocating gigabytes.
A field that names one of a fixed set of choices is a Literal, refused by the same layer with the valid names."""
import dataclasses
import math
import re
import typing

import pytest

import tta
from tta.adapter import ADAPTERS
from tta.config import declared_ranges, literal_choices, make_config, named_by, numeric_fields

CONFIGS = {name: ADAPTERS.get(name).Config for name in tta.list_adapters()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_numeric_field_declares_a_range_its_default_lies_in(name):
    cls = CONFIGS[name]
    undeclared = set(numeric_fields(cls)) - set(declared_ranges(cls))
    assert not undeclared, f"{name}: numeric fields without a declared range: {sorted(undeclared)}"
    cls()  # the defaults pass their own ranges


OUT_OF_RANGE = [  # values once accepted without complaint, then more
    ("tent", "momentum", math.nan, r"\[0, 1\]"), ("tent", "lr", -1e-3, r"\[0, 1e\+12\]"),
    ("tent", "weight_decay", math.inf, r"\[0, 1e\+12\]"), ("tent", "betas", (1.0, 0.999), r"\[0, 1\)"),
    ("cotta", "ema_momentum", 2, r"\[0, 1\]"), ("cotta", "restore_prob", -1, r"\[0, 1\]"),
    ("cotta", "restore_prob", 5, r"\[0, 1\]"), ("cotta", "confidence_threshold", 1.5, r"\[0, 1\]"),
    ("sar", "rho", -1, r"\[0, 1e\+12\]"), ("sar", "e_margin_scale", -0.4, r"\[0, 1\]"),
    ("eata", "d_margin", math.nan, r"\[0, 1\]"), ("eata", "fisher_alpha", math.inf, r"\[0, 1e\+12\]"),
    ("memo", "n_augmentations", 0, r"\[1, 1024\]"), ("cotta", "n_augmentations", 0, r"\[1, 1024\]"),
    ("it3", "ema_momentum", -0.1, r"\[0, 1\]"), ("slow_inference", "min_delta", -1.0, r"\[0, 1e\+12\]"),
    ("diffusion_tta", "lora_rank", 0, r"\[1, 4096\]"), ("diffusion_tta", "seed", -1, r"\[0, "),
    ("diffusion_classifier", "temperature", 0.0, r"\(0, 1e\+12\]"),
]
# Work per call: each of these once hung or tried to allocate tens of gigabytes.
UNBOUNDED_WORK = [
    ("tent", "steps", 10 ** 9, r"\[0, 10_000\]"), ("slow_inference", "steps", 10 ** 9, r"\[0, 10_000\]"),
    ("diffusion_tta", "pairs", 10 ** 9, r"\[1, 10_000\]"), ("memo", "n_augmentations", 10 ** 9, r"\[1, 1024\]"),
    ("cotta", "n_augmentations", 10 ** 9, r"\[1, 1024\]"), ("ttt_mae", "views", 10 ** 9, r"\[1, 1024\]"),
    ("diffusion_classifier", "samples", (10 ** 9,), r"\[1, 10_000\]"),
    ("diffusion_classifier", "n_trials", 10 ** 9, r"\[1, 1000\]"),
]


@pytest.mark.parametrize("name, key, value, allowed", OUT_OF_RANGE + UNBOUNDED_WORK)
def test_values_out_of_range_are_refused_naming_field_value_and_range(name, key, value, allowed):
    field = re.escape(key) + (r"\[0\]" if isinstance(value, tuple) else "")
    shown = re.escape(repr(value[0] if isinstance(value, tuple) else value))
    with pytest.raises(ValueError, match=rf"{field} must be an? (integer|number) in {allowed}.*got {shown}$"):
        make_config(CONFIGS[name], None, {key: value})


def test_every_way_of_building_a_config_checks_the_ranges():
    cls = CONFIGS["cotta"]
    with pytest.raises(ValueError, match="ema_momentum"):
        cls(ema_momentum=2.0)
    with pytest.raises(ValueError, match="restore_prob"):
        dataclasses.replace(cls(), restore_prob=-1.0)
    with pytest.raises(ValueError, match="n_augmentations"):
        tta.create_adapter("cotta", object(), n_augmentations=0)  # before the model is looked at


def test_a_benchmark_file_with_a_value_out_of_range_names_the_method_and_field():
    from tta.bench.runner import plan_jobs
    from tta.bench.spec import parse_spec
    spec = parse_spec({"name": "ranges", "model": {"name": "zoo:fmnist-cnn"},
                       "data": {"kind": "fashion-mnist", "corruptions": ["fog"], "per_class": 1},
                       "methods": [{"name": "cotta", "config": {"ema_momentum": 2.0}}]}, "ranges.yaml")
    with pytest.raises(ValueError, match=r"ema_momentum must be a number in \[0, 1\], got 2\.0"):
        plan_jobs(spec, spec.methods)


def test_the_declared_ranges_are_the_constraints_pydantic_enforces():
    """The annotations are annotated_types constraints, so a move to pydantic models keeps them unchanged."""
    pydantic = pytest.importorskip("pydantic")
    for name, cls in CONFIGS.items():
        model = pydantic.dataclasses.dataclass(type(f"{cls.__name__}Checked", (), {
            "__annotations__": dict(declared_ranges(cls))}))
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name in declared_ranges(cls)}
        model(**fields)  # the defaults pass pydantic's checks
        for case_name, key, value, _ in OUT_OF_RANGE + UNBOUNDED_WORK:
            if case_name == name:
                with pytest.raises(pydantic.ValidationError):
                    model(**{**fields, key: value})


# ---- choice fields: Literal types, checked by the same layer ------------------------------------------------------
def choice_fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: literal_choices(hints[f.name]) for f in dataclasses.fields(cls) if literal_choices(hints[f.name])}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_choice_field_refuses_an_unknown_name_listing_the_valid_ones(name):
    cls = CONFIGS[name]
    assert "optimizer" in choice_fields(cls)  # every method's optimizer is one
    for key, names in choice_fields(cls).items():
        typo = f"{names[0]}x"
        valid = re.escape(", ".join(names))
        with pytest.raises(ValueError, match=rf"{cls.__qualname__}: unknown {key} '{re.escape(typo)}'\. Did you mean "
                                             rf"'{re.escape(names[0])}'\? Valid choices: {valid}"):
            cls(**{key: typo})
        with pytest.raises(ValueError, match=rf"{key} must be (.* or )?one of {valid}.*got int 3"):
            cls(**{key: 3})
        for value in names:  # every valid name is accepted
            assert getattr(cls(**{key: value}), key) == value


def test_choice_messages_say_what_else_is_allowed_and_why():
    from tta.methods.sar import SARConfig
    with pytest.raises(ValueError, match=r"unknown recovery 'paper'.*Valid choices: source, official, zoo \(or null\)"):
        SARConfig(recovery="paper")
    with pytest.raises(ValueError, match=r"unknown autocast 'True'.*\(or true or false\) \(write true or false without "
                                         r"quotes\); true means auto"):
        tta.create_adapter("diffusion_tta", object(), autocast="True")


def test_a_mapping_of_choices_must_name_exactly_the_literal_ones():
    assert named_by(typing.Literal["a", "b"], {"b": 1, "a": 2}) == {"b": 1, "a": 2}
    with pytest.raises(TypeError, match=r"losses has the names \['a'\], its Literal type \['a', 'b'\]"):
        named_by(typing.Literal["a", "b"], {"a": 1}, "losses")
