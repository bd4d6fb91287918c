"""KV policy settings: one validated schema for YAML files and ``additional_config``.

Keys (all optional except ``kv_policy``):

=================== ========================================== ============
key                 meaning                                    default
=================== ========================================== ============
kv_policy           full | fastgen | streamingllm | h2o |      (required)
                    snapkv
recovery_ratio      fastgen: attention mass T a head's policy  0.95
                    must recover
local_ratio         fastgen: local window, fraction of length  0.3
frequent_ratio      fastgen: frequent tokens, fraction         0.3
budget_ratio        baselines: KV kept, fraction of length     0.5
sink_tokens         streamingllm: attention sinks kept         4
recent_fraction     h2o: share of the budget for recent tokens 0.5
window              snapkv: observation window kept            32
pool_kernel         snapkv: max-pool width over scores (odd)   7
observation_window  profiling: last W prompt queries used      64
=================== ========================================== ============

A key that does not apply to the chosen policy is an error, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .policies import POLICY_NAMES, make_policy

PROFILING_KEYS = {"observation_window": 64}


@dataclass(frozen=True)
class KVPolicyConfig:
    """A policy instance plus the profiling settings that go with it."""

    policy: Any
    observation_window: int = 64

    def __post_init__(self) -> None:
        w = self.observation_window
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"observation_window={w!r} is invalid: allowed values are integers >= 1")

    @property
    def name(self) -> str:
        return self.policy.name

    def to_dict(self) -> dict:
        fields = {f.name: getattr(self.policy, f.name) for f in dataclasses.fields(self.policy)}
        return {"kv_policy": self.name, **fields, "observation_window": self.observation_window}


def parse_policy_config(settings: Mapping[str, Any]) -> KVPolicyConfig:
    """Validate a mapping such as ``{"kv_policy": "fastgen", "recovery_ratio": 0.9}``."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"kv policy settings must be a mapping, got {type(settings).__name__}")
    settings = dict(settings)
    name = settings.pop("kv_policy", None)
    if name is None:
        raise ValueError(f"kv_policy is missing: allowed values are {', '.join(POLICY_NAMES)}")
    profiling = {k: settings.pop(k) for k in list(settings) if k in PROFILING_KEYS}
    policy = make_policy(str(name), **settings)
    return KVPolicyConfig(policy=policy, **profiling)


def load_policy_file(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> KVPolicyConfig:
    """Read a YAML policy file (see configs/); ``overrides`` win over the file."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"kv policy config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"kv policy config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"kv policy config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return parse_policy_config({**data, **(overrides or {})})
