"""The soak's traffic, without a server: every kind is sent, and its per-request
overrides agree with the plugin's validator (valid ones pass, invalid ones are
refused naming the field the soak expects the 400 to name)."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_adaptive_kv.apps.soak import INVALID_OVERRIDES, VALID_OVERRIDES, CaseMaker, SoakConfig
from vllm_adaptive_kv.plugin import validation
from vllm_adaptive_kv.plugin.engine_args import validated_settings


@pytest.fixture
def fastgen_server(monkeypatch):
    monkeypatch.setattr(validation, "server_policy_settings", lambda: validated_settings({"kv_policy": "fastgen"}))


def test_the_first_cases_cover_every_kind_and_the_stream_is_seeded():
    cfg = SoakConfig(seed=3)
    kinds = [k for k, _ in CaseMaker.KINDS]
    maker = CaseMaker(cfg)
    assert [maker.next().kind for _ in kinds] == kinds
    first, second = CaseMaker(cfg), CaseMaker(cfg)
    assert [first.next().body for _ in range(30)] == [second.next().body for _ in range(30)]


def test_cases_are_well_formed():
    maker = CaseMaker(SoakConfig(seed=5, max_model_len=1024))
    for _ in range(200):
        case = maker.next()
        assert case.path in ("/v1/completions", "/v1/chat/completions")
        assert ("messages" in case.body) == (case.path == "/v1/chat/completions")
        if case.kind == "max_tokens_1":
            assert case.body["max_tokens"] == 1
        if case.kind == "n_gt_1":
            assert case.body["n"] > 1
        if case.kind == "too_long":
            text = case.body.get("prompt") or case.body["messages"][0]["content"]
            assert len(text.split()) > 1024  # more words than max_model_len has tokens
        if case.expect == "invalid":
            assert case.field
        if case.expect == "cancel":
            assert case.body["stream"] and case.cancel_after >= 1


@pytest.mark.parametrize("override", VALID_OVERRIDES)
def test_valid_overrides_pass_the_validator(fastgen_server, override):
    validation.RequestPolicyValidator.validate_params(SamplingParams(extra_args=dict(override)))


@pytest.mark.parametrize("override, field", INVALID_OVERRIDES)
def test_invalid_overrides_are_refused_naming_their_field(fastgen_server, override, field):
    with pytest.raises(VLLMValidationError, match=field):
        validation.RequestPolicyValidator.validate_params(SamplingParams(extra_args=dict(override)))


def test_a_4xx_sent_as_a_streams_error_event_is_read():
    from vllm_adaptive_kv.apps.soak import stream_error_code

    event = 'data: {"error": {"message": "recovery_ratio=7 is invalid", "type": "BadRequestError", "code": 400}}'
    assert stream_error_code(event + "\n\ndata: [DONE]\n\n") == 400
    assert stream_error_code('data: {"choices": []}\n\ndata: [DONE]\n') is None
