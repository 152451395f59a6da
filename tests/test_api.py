import dataclasses

import pytest
import torch

import tta
from tta.adapter import ADAPTERS

from fixtures import methods, model_and_config, tiny_model


def test_the_seven_baselines_are_registered():
    assert methods("baseline") == ["cotta", "eata", "memo", "norm", "sar", "source", "tent"]
    assert tta.list_adapters("t*") == [n for n in tta.list_adapters() if n.startswith("t")]


def test_unknown_adapter_lists_valid_names():
    with pytest.raises(KeyError, match="Did you mean 'tent'.*Valid choices:.*norm"):
        tta.create_adapter("tnet", tiny_model())


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(TypeError, match=r"unknown config key\(s\) \['learning_rate'\].*valid keys:.*lr"):
        tta.create_adapter("tent", tiny_model(), learning_rate=1e-3)


@pytest.mark.parametrize("bad", [{"steps": -1}, {"optimizer": "rmsprop"}, {"lr": -1.0}, {"steps": 1.5}])
def test_invalid_config_values_are_refused(bad):
    with pytest.raises((ValueError, KeyError)):
        tta.create_adapter("tent", tiny_model(), **bad)


@pytest.mark.parametrize("name", tta.list_adapters())
def test_config_round_trips(name):
    model, config, _ = model_and_config(name)
    adapter = tta.create_adapter(name, model, **config)
    values = dataclasses.asdict(adapter.cfg)
    assert type(adapter.cfg)(**values) == adapter.cfg
    again = tta.create_adapter(name, model_and_config(name)[0], **values)
    assert again.cfg == adapter.cfg


def test_overrides_reach_the_optimizer():
    adapter = tta.create_adapter("tent", tiny_model(), lr=0.123, optimizer="adam")
    assert isinstance(adapter.optimizer, torch.optim.Adam)
    assert adapter.optimizer.param_groups[0]["lr"] == 0.123


def test_paper_defaults():
    assert ADAPTERS.get("tent").Config().lr == 2.5e-4
    assert ADAPTERS.get("memo").Config().episodic is True
    assert ADAPTERS.get("cotta").Config().ema_momentum == 0.999
    assert ADAPTERS.get("eata").Config().fisher_alpha == 2000.0


@pytest.mark.parametrize("bad, error, match", [
    ("not a tensor", TypeError, "torch.Tensor"),
    (torch.rand(3, 16, 16), ValueError, "unsqueeze"),
    (torch.rand(0, 3, 16, 16), ValueError, "empty"),
    (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), TypeError, "255"),
    (torch.rand(2, 3, 16, 16) * 255, ValueError, "divide by 255"),
    (torch.full((2, 3, 16, 16), float("nan")), ValueError, "NaN"),
    (torch.rand(2, 1, 16, 16), ValueError, "3 channels"),
    (torch.rand(2, 16, 16, 3), ValueError, "permute"),
])
def test_bad_input_gets_a_clear_error(bad, error, match):
    adapter = tta.create_adapter("tent", tiny_model())
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    with pytest.raises(error, match=match):
        adapter(bad)
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused input must not change the model"
