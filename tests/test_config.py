"""Policy settings from YAML files and dicts: shipped files load, bad values are named."""

from __future__ import annotations

import pathlib

import pytest

from vllm_adaptive_kv.config import load_policy_file, parse_policy_config
from vllm_adaptive_kv.policies import POLICY_NAMES

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_shipped_config_loads_and_round_trips(name):
    config = load_policy_file(CONFIGS / f"{name}.yaml")
    assert config.name == name
    assert parse_policy_config(config.to_dict()) == config


def test_overrides_win_over_the_file():
    config = load_policy_file(CONFIGS / "fastgen.yaml", {"recovery_ratio": 0.9})
    assert config.policy.recovery_ratio == 0.9 and config.policy.local_ratio == 0.3


@pytest.mark.parametrize(
    "settings, message",
    [
        ({}, "kv_policy is missing: allowed values are full, fastgen, streamingllm, h2o, snapkv"),
        ({"kv_policy": "fastgen", "observation_window": 0}, "observation_window=0"),
        ({"kv_policy": "full", "recovery_ratio": 0.9}, "unknown hyperparameter.*recovery_ratio.*kv_policy='full'"),
        ({"kv_policy": "h2o", "window": 3}, "unknown hyperparameter.*window"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        parse_policy_config(settings)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_policy_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_policy_file(bad)
