"""Per-request settings (issue 13, point 6), checked in the frontend's validator.

Keys that are not ours pass through to other extensions; a near miss of one of
our keys next to our settings is a typo and gets a clear error. The same checks
through a real server's HTTP API are in tests/test_reliability_server.py.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_adaptive_kv.core.config import policy_fields
from vllm_adaptive_kv.plugin import validation
from vllm_adaptive_kv.plugin.engine_args import validated_settings


def keys_of(name: str) -> str:
    return ", ".join(["kv_policy", *policy_fields(name), "observation_window", "compress_by_chunk"])


@pytest.fixture
def server_default(monkeypatch):
    """Pretend the frontend built a fastgen engine config (the validator's default)."""
    settings = validated_settings({"kv_policy": "fastgen"})
    monkeypatch.setattr(validation, "server_policy_settings", lambda: settings)
    return settings


def validate(extra_args: dict) -> None:
    validation.RequestPolicyValidator.validate_params(SamplingParams(extra_args=extra_args))


@pytest.mark.parametrize("extra_args, message", [
    ({"kv_policy": "fastgen", "recovery_ration": 0.9},
     r"unknown key 'recovery_ration' \(did you mean 'recovery_ratio'\?\): allowed keys for "
     r"kv_policy='fastgen' are " + keys_of("fastgen") + "$"),
    ({"kv_policy": "h2o", "budget_ration": 0.5},
     r"unknown key 'budget_ration' \(did you mean 'budget_ratio'\?\): allowed keys for kv_policy='h2o' "
     r"are " + keys_of("h2o") + "$"),
    ({"local_ratio": 0.2, "frequent_ration": 0.2},  # our hyperparameter without kv_policy: the server's policy
     r"unknown key 'frequent_ration'.*kv_policy='fastgen'"),
    ({"kv_policy": "nope", "windows": 8}, r"unknown key 'windows' \(did you mean 'window'\?\): allowed keys are "),
])
def test_a_misspelled_key_next_to_our_settings_is_named(server_default, extra_args, message):
    with pytest.raises(VLLMValidationError, match=message):
        validate(extra_args)


@pytest.mark.parametrize("extra_args", [
    {"someone_else": 7},
    {"recovery_ration": 0.9},  # a near miss alone may be another extension's key
    {"kv_policy": "fastgen", "recovery_ratio": 0.9, "top_n_sigma": 1.0, "logit_bias_tokens": [1, 2]},
    {"kv_policy": "full", "my_extension": {"nested": True}},
])
def test_keys_that_are_not_ours_pass_through(server_default, extra_args):
    params = SamplingParams(extra_args=dict(extra_args))
    validation.RequestPolicyValidator.validate_params(params)
    assert params.extra_args == extra_args  # untouched for the extensions that read them


def test_allowed_keys_without_a_known_policy_lists_every_key():
    text = validation.allowed_keys_text({"observation_window": 8}, None)
    assert text.startswith("are ") and "recovery_ratio" in text and "sink_tokens" in text


@pytest.mark.parametrize("extra_args, message", [
    ({"recent_window": 32, "decode_protect": 16}, None),  # FastGen's variants, per request (issue 15)
    ({"kv_policy": "fastgen-paper", "recovery_ratio": 0.9}, None),
    ({"recent_window": -3}, r"recent_window=-3 is invalid: allowed values are integers from 0 to 1024"),
    ({"kv_policy": "fastgen-paper", "recent_window": 8}, r"recent_window=8 is invalid for kv_policy='fastgen-paper'"),
    ({"kv_policy": "fastgen", "recent_windw": 8}, r"unknown key 'recent_windw' \(did you mean 'recent_window'\?\)"),
])
def test_fastgen_variant_keys_per_request(server_default, extra_args, message):
    if message is None:
        validate(extra_args)
    else:
        with pytest.raises(VLLMValidationError, match=message):
            validate(extra_args)
