"""Policy settings from YAML files and dicts: shipped files load, bad values are named."""

from __future__ import annotations

import pathlib

import pytest

from vllm_adaptive_kv.core.config import load_policy_file, parse_policy_config
from vllm_adaptive_kv.core.policies import POLICY_NAMES

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


# --- keys shared with vLLM's additional_config / extra_args ------------------------------


def test_policy_keys_cover_every_policy_and_profiling_key():
    from vllm_adaptive_kv.core.config import POLICY_KEYS, policy_fields

    assert {"kv_policy", "observation_window", "recovery_ratio", "sink_tokens", "pool_kernel"} <= POLICY_KEYS
    for name in POLICY_NAMES:
        assert set(policy_fields(name)) <= POLICY_KEYS


def test_split_policy_settings_keeps_foreign_keys_apart():
    from vllm_adaptive_kv.core.config import split_policy_settings

    policy, other = split_policy_settings({"kv_policy": "h2o", "budget_ratio": 0.4, "lora_dir": "/x"})
    assert policy == {"kv_policy": "h2o", "budget_ratio": 0.4} and other == {"lora_dir": "/x"}
    assert split_policy_settings(None) == ({}, {})


def test_read_policy_file_returns_the_raw_mapping(tmp_path):
    from vllm_adaptive_kv.core.config import read_policy_file

    partial = tmp_path / "partial.yaml"
    partial.write_text("recovery_ratio: 0.9\n")  # no kv_policy: the CLI may add it
    assert read_policy_file(partial) == {"recovery_ratio": 0.9}
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1\n")
    with pytest.raises(ValueError, match="is not valid YAML") as caught:
        read_policy_file(broken)
    assert "\n" not in str(caught.value)


FASTGEN_SERVER = {"kv_policy": "fastgen", "recovery_ratio": 0.9, "local_ratio": 0.2, "frequent_ratio": 0.3,
                  "recent_window": 8, "decode_protect": 0, "pool_kernel": 1, "observation_window": 32,
                  "compress_by_chunk": False}


@pytest.mark.parametrize(
    "extra_args, expected",
    [
        (None, FASTGEN_SERVER),
        ({"unrelated": 1}, FASTGEN_SERVER),
        ({"local_ratio": 0.1}, {**FASTGEN_SERVER, "local_ratio": 0.1}),
        ({"kv_policy": "fastgen", "frequent_ratio": 0.5}, {**FASTGEN_SERVER, "frequent_ratio": 0.5}),
        # FastGen's variants per request; the paper's FastGen by name, from its own defaults
        ({"recent_window": 32, "decode_protect": 16}, {**FASTGEN_SERVER, "recent_window": 32, "decode_protect": 16}),
        ({"kv_policy": "fastgen-paper"}, {"kv_policy": "fastgen-paper", "recovery_ratio": 0.95, "local_ratio": 0.3,
                                          "frequent_ratio": 0.3, "recent_window": 0, "decode_protect": 0,
                                          "pool_kernel": 1, "observation_window": 32,
                                          "compress_by_chunk": False}),
        # another policy starts from its own defaults; only the profiling settings carry over
        ({"kv_policy": "h2o"}, {"kv_policy": "h2o", "budget_ratio": 0.5, "recent_fraction": 0.5,
                                "observation_window": 32, "compress_by_chunk": False}),
        ({"kv_policy": "streamingllm", "sink_tokens": 8, "observation_window": 16},
         {"kv_policy": "streamingllm", "budget_ratio": 0.5, "sink_tokens": 8, "observation_window": 16,
          "compress_by_chunk": False}),
        ({"compress_by_chunk": True}, {**FASTGEN_SERVER, "compress_by_chunk": True}),
        # over HTTP, vllm_xargs turns JSON true into 1
        ({"compress_by_chunk": 1}, {**FASTGEN_SERVER, "compress_by_chunk": True}),
        ({"compress_by_chunk": "false"}, {**FASTGEN_SERVER, "compress_by_chunk": False}),
    ],
)
def test_request_policy_settings(extra_args, expected):
    from vllm_adaptive_kv.core.config import request_policy_settings

    assert request_policy_settings(FASTGEN_SERVER, extra_args) == expected


@pytest.mark.parametrize(
    "extra_args, message",
    [
        ({"recovery_ratio": 1.5}, r"recovery_ratio=1.5 is invalid: allowed values are numbers in \(0, 1\]"),
        ({"budget_ratio": 0.5}, "unknown hyperparameter.*budget_ratio.*allowed keys"),
        ({"kv_policy": "h2o", "recovery_ratio": 0.9}, "unknown hyperparameter.*recovery_ratio.*kv_policy='h2o'"),
        ({"kv_policy": "bogus"}, "kv_policy='bogus' is unknown: allowed values are full, fastgen"),
        ({"observation_window": 0}, "observation_window=0"),
        ({"compress_by_chunk": "yes"}, "compress_by_chunk='yes' is invalid: allowed values are true and false"),
        ({"compress_by_chunk": 2}, "compress_by_chunk=2 is invalid"),
        ({"kv_policy": "full", "compress_by_chunk": True}, "compress_by_chunk=True does not apply to "
                                                           "kv_policy='full'"),
        ({"recent_window": -4}, r"recent_window=-4 is invalid: allowed values are integers from 0 to 1024"),
        ({"kv_policy": "fastgen-paper", "decode_protect": 8}, r"decode_protect=8 is invalid for kv_policy='fastgen-paper'"),
    ],
)
def test_request_policy_settings_names_bad_values(extra_args, message):
    from vllm_adaptive_kv.core.config import request_policy_settings

    with pytest.raises(ValueError, match=message):
        request_policy_settings(FASTGEN_SERVER, extra_args)


def test_a_servers_compress_by_chunk_follows_requests_to_evicting_policies_only():
    from vllm_adaptive_kv.core.config import request_policy_settings

    server = {**FASTGEN_SERVER, "compress_by_chunk": True}
    assert request_policy_settings(server, {"kv_policy": "h2o"})["compress_by_chunk"] is True
    full = request_policy_settings(server, {"kv_policy": "full"})
    assert full == {"kv_policy": "full", "observation_window": 32, "compress_by_chunk": False}
