"""Per-request kv policy settings checked when a request arrives (HTTP 400, not a dead engine).

vLLM calls ``LogitsProcessor.validate_params`` of every custom logits processor in
the frontend's InputProcessor, before a request reaches the engine core. That is
the only request-validation hook it offers, so the check rides on a no-op logits
processor, which ``engine_args`` adds to ``logits_processors`` when a kv policy is
configured.

``validate_params`` receives only the SamplingParams. The server's default policy
is looked up, in order, from the current vLLM config (unset in the frontend in
vLLM 0.32), then from the last engine config this process built (``LLM``, and
``vllm serve`` / ``run-batch`` with one API server). A process that built none
(extra API-server processes) checks each request key against the policy the
request names, or else against a policy that has the key; the engine re-checks
against the real default.

Keys that are not ours pass through untouched: other extensions read
``extra_args`` too. The one exception is a request that carries our settings
(``kv_policy`` or a hyperparameter) next to a key that is a near miss of one of
ours, such as ``recovery_ration``: that is a typo that would otherwise silently
fall back to a default, so it gets a 400 naming the key and the keys allowed.
A near miss alone, without any of our keys, passes: it may be another
extension's key, and the request simply runs the server's policy.
"""

from __future__ import annotations

import difflib

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import LogitsProcessor

from ..core.config import (
    POLICY_KEYS,
    PROFILING_KEYS,
    parse_policy_config,
    policy_fields,
    request_policy_settings,
    split_policy_settings,
)
from ..core.policies import POLICY_NAMES
from .engine_args import policy_settings_of, remembered_policy_settings


class RequestPolicyValidator(LogitsProcessor):
    """Rejects bad kv policy keys in ``SamplingParams.extra_args``; changes no logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request, foreign = split_policy_settings(sampling_params.extra_args)
        if not request:
            return
        try:
            default = server_policy_settings()
            check_misspelled_keys(foreign, request, default)
            check_request_settings(request, default)
        except ValueError as err:
            raise VLLMValidationError(f"kv policy settings of the request (extra_args / vllm_xargs): {err}") from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass


def server_policy_settings() -> dict | None:
    """The server's default policy dict as far as this process knows it, or None."""
    from vllm.config import get_current_vllm_config_or_none

    current = get_current_vllm_config_or_none()
    settings = policy_settings_of(current) if current is not None else None
    return settings or remembered_policy_settings()


def check_request_settings(request: dict, default: dict | None) -> None:
    """Raise ValueError naming a bad request key or value; ``request`` holds only policy keys."""
    if default is not None:
        request_policy_settings(default, request)
    elif "kv_policy" in request:
        parse_policy_config(request)
    else:
        for key, value in request.items():
            parse_policy_config({"kv_policy": owner_of(key), key: value})


# How close (difflib ratio) a foreign key must be to one of ours to count as its
# misspelling: 'recovery_ration' scores 0.97 against 'recovery_ratio', and keys of
# other extensions seen so far (e.g. 'top_n_sigma', 'logit_bias_tokens') below 0.6.
NEAR_MISS_CUTOFF = 0.8


def check_misspelled_keys(foreign: dict, request: dict, default: dict | None) -> None:
    """Raise ValueError for a foreign key that is a near miss of one of our keys.

    ``request`` holds the request's policy keys (at least one), ``foreign`` its other
    keys; the allowed keys are those of the policy the request runs.
    """
    for key in sorted(map(str, foreign)):
        near = difflib.get_close_matches(key, POLICY_KEYS, n=1, cutoff=NEAR_MISS_CUTOFF)
        if near:
            raise ValueError(f"unknown key {key!r} (did you mean {near[0]!r}?): allowed keys "
                             f"{allowed_keys_text(request, default)}")


def allowed_keys_text(request: dict, default: dict | None) -> str:
    """'for kv_policy=<name> are ...' for the policy the request runs, or every key when unknown."""
    name = request.get("kv_policy") or (default or {}).get("kv_policy")
    try:
        fields = policy_fields(str(name)) if name is not None else None
    except ValueError:  # an unknown policy name: list every key
        fields = None
    if fields is None:
        return "are " + ", ".join(sorted(POLICY_KEYS))
    profiling = [key for key in PROFILING_KEYS if name != "full" or key != "compress_by_chunk"]  # full evicts nothing
    return f"for kv_policy={name!r} are " + ", ".join(["kv_policy", *fields, *profiling])


def owner_of(key: str) -> str:
    """A policy that has hyperparameter ``key`` (any policy for observation_window)."""
    return next((name for name in POLICY_NAMES if key in policy_fields(name)), POLICY_NAMES[0])
