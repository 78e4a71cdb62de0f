"""Typed settings: built once from a validated config, field for field; dict overrides typed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jasper_jax.config import load_config, load_settings, to_settings
from jasper_jax.errors import UserError
from jasper_jax.settings import Settings

RECIPES = [
    ("embedded_default:1", {}),
    ("embedded_default:2", {}),
    ("embedded_default:3", {}),
    ("embedded_default:4", {"init_from": "/stage3"}),
    ("embedded_default:long", {}),
    ("jasper_paper:1", {}),
    ("jasper_paper:3", {}),
    ("jasper_paper:4", {"init_from": "/stage3"}),
    ("jasper_paper:long", {}),
]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


@pytest.mark.parametrize(("spec", "overrides"), RECIPES)
def test_settings_hold_every_config_field_with_its_value(spec, overrides):
    """No field of a config file is dropped, and no setting silently keeps a default the config
    does not state: the two flattened trees are equal, values included."""
    config = load_config(spec, overrides)
    settings = to_settings(config)
    assert _flat(dataclasses.asdict(settings)) == _flat(config.to_dict())


def test_settings_are_frozen_and_typed():
    s = load_settings("embedded_default:3", {"model.heads": [1152, 64], "optim.lr": 1})
    assert s.model.heads == (1152, 64) and isinstance(s.model.heads, tuple)
    assert s.optim.lr == 1.0 and isinstance(s.optim.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.data.batch_size = 3  # type: ignore[misc]


def test_dict_overrides_take_typed_values():
    s = load_settings("embedded_default:2", {"data.train_dir": Path("/data/train"), "seed": 7})
    assert s.data.train_dir == "/data/train" and s.seed == 7
    with pytest.raises(UserError, match=r"override train.steps='10': expected int, got str"):
        load_settings("embedded_default:2", {"train.steps": "10"})
    with pytest.raises(UserError, match="expected bool"):
        load_settings("embedded_default:2", {"model.dropout": 1})
    with pytest.raises(UserError, match="no field 'stpes'"):
        load_settings("embedded_default:2", {"train.stpes": 10})


def test_a_config_field_no_code_reads_is_refused():
    config = load_config("embedded_default:1")
    config.data.bach_size = 64  # a typo in a config file
    with pytest.raises(UserError, match=r"config field data.bach_size is not a setting"):
        to_settings(config)


def test_settings_are_validated_like_the_config():
    config = load_config("embedded_default:1")
    config.data.batch_size = 1
    with pytest.raises(UserError, match="config field data.batch_size"):
        to_settings(config)
    assert isinstance(to_settings(load_config("embedded_default:1")), Settings)
