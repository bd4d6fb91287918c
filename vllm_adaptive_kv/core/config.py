"""KV policy settings: one validated schema for YAML files and ``additional_config``.

Keys (all optional except ``kv_policy``):

=================== ========================================== ============
key                 meaning                                    default
=================== ========================================== ============
kv_policy           full | fastgen | streamingllm | h2o |      (required)
                    snapkv | fastgen-paper
recovery_ratio      fastgen: attention mass T a head's policy  0.95
                    must recover
local_ratio         fastgen: local window, fraction of length  0.3
frequent_ratio      fastgen: frequent tokens, fraction         0.3
recent_window       fastgen: last tokens every compressed rung 32
                    keeps (not in the paper; 0 = off)
decode_protect      fastgen: generated tokens kept until this  0
                    many later tokens exist (0 = off)
budget_ratio        baselines: KV kept, fraction of length     0.5
sink_tokens         streamingllm: attention sinks kept         4
recent_fraction     h2o: share of the budget for recent tokens 0.5
window              snapkv: observation window kept            32
pool_kernel         snapkv, fastgen: max-pool width over       7 (snapkv),
                    scores before the top-k (odd; fastgen's    1 (fastgen)
                    frequent rung, not in the paper)
observation_window  profiling: last W prompt queries used      64
compress_by_chunk   evict at the end of each prefill chunk of  false
                    >= W tokens ending before the prompt's
                    last W, profiled on its own last W
                    queries (any policy but full; see below)
=================== ========================================== ============

A key that does not apply to the chosen policy is an error, so a typo never
silently falls back to a default. ``fastgen-paper`` takes fastgen's keys, with
``recent_window`` and ``decode_protect`` fixed at 0 and ``pool_kernel`` at 1 (the
paper's FastGen).

``compress_by_chunk``: a long prompt prefilled in chunks then never holds all of
its tokens at once, so admitting by chunk (vLLM's ``--no-scheduler-reserve-full-isl``)
can run more requests in the same pages. A chunk evicts if it holds a whole
observation window and ends before the prompt's last window begins (so the
prompt's end still profiles a full window). Its eviction is the policy's
prompt-end eviction as if the prompt ended there (a per-head policy profiles the
chunk's last ``observation_window`` queries), and scores restart at each chunk:
tokens evicted early are gone for later chunks, so it trades quality for memory
(docs/performance.md measures it).

The same keys travel through vLLM's ``additional_config`` (server default, stored
in ``KVPolicyConfig.to_dict()`` form) and ``SamplingParams.extra_args`` (per-request
override, see ``request_policy_settings``); ``split_policy_settings`` separates
them from keys that belong to other plugins.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .policies import POLICY_NAMES, make_policy

PROFILING_KEYS = {"observation_window": 64, "compress_by_chunk": False}


def policy_fields(name: str) -> tuple[str, ...]:
    """Hyperparameter keys of policy ``name`` (every field has a default)."""
    return tuple(f.name for f in dataclasses.fields(make_policy(name)))


# Every key this package reads from additional_config / extra_args; any other key
# belongs to someone else and is passed through untouched.
POLICY_KEYS = frozenset(
    {"kv_policy", *PROFILING_KEYS, *(key for name in POLICY_NAMES for key in policy_fields(name))}
)


@dataclass(frozen=True)
class KVPolicyConfig:
    """A policy instance plus the profiling settings that go with it."""

    policy: Any
    observation_window: int = 64
    compress_by_chunk: bool = False

    def __post_init__(self) -> None:
        w = self.observation_window
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"observation_window={w!r} is invalid: allowed values are integers >= 1")
        if not isinstance(self.compress_by_chunk, bool):
            raise ValueError(f"compress_by_chunk={self.compress_by_chunk!r} is invalid: allowed values are "
                             "true and false (or 1 and 0)")
        if self.compress_by_chunk and self.policy.name == "full":
            evicting = ", ".join(name for name in POLICY_NAMES if name != "full")
            raise ValueError("compress_by_chunk=True does not apply to kv_policy='full' (it evicts nothing): "
                             f"allowed with {evicting}")

    @property
    def name(self) -> str:
        return self.policy.name

    def to_dict(self) -> dict:
        fields = {f.name: getattr(self.policy, f.name) for f in dataclasses.fields(self.policy)}
        return {"kv_policy": self.name, **fields, "observation_window": self.observation_window,
                "compress_by_chunk": self.compress_by_chunk}


def as_flag(value: Any) -> Any:
    """1 / 0 and "true" / "false" as bools (vLLM's ``vllm_xargs`` carries no JSON bool over
    HTTP: ``true`` arrives as 1); any other value is returned as is, for the check to name."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_policy_config(settings: Mapping[str, Any]) -> KVPolicyConfig:
    """Validate a mapping such as ``{"kv_policy": "fastgen", "recovery_ratio": 0.9}``."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"kv policy settings must be a mapping, got {type(settings).__name__}")
    settings = dict(settings)
    name = settings.pop("kv_policy", None)
    if name is None:
        raise ValueError(f"kv_policy is missing: allowed values are {', '.join(POLICY_NAMES)}")
    profiling = {k: settings.pop(k) for k in list(settings) if k in PROFILING_KEYS}
    if "compress_by_chunk" in profiling:
        profiling["compress_by_chunk"] = as_flag(profiling["compress_by_chunk"])
    policy = make_policy(str(name), **settings)
    return KVPolicyConfig(policy=policy, **profiling)


def load_policy_file(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> KVPolicyConfig:
    """Read a YAML policy file (see configs/); ``overrides`` win over the file."""
    return parse_policy_config({**read_policy_file(path), **(overrides or {})})


def read_policy_file(path: str | os.PathLike) -> dict:
    """The raw mapping of a YAML policy file, not yet validated.

    Separate from ``load_policy_file`` because the CLI merges ``--kv-policy`` and
    ``--additional-config`` into it before validating.
    """
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"kv policy config file {str(path)!r} does not exist") from None
    except OSError as err:
        raise ValueError(f"kv policy config file {str(path)!r} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())  # PyYAML's message spans lines; errors are one line
        raise ValueError(f"kv policy config file {str(path)!r} is not valid YAML: {detail}") from None
    if not isinstance(data, dict):
        raise ValueError(f"kv policy config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def split_policy_settings(mapping: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """Split ``mapping`` into (keys in POLICY_KEYS, all other keys)."""
    mapping = mapping or {}
    policy = {k: v for k, v in mapping.items() if k in POLICY_KEYS}
    other = {k: v for k, v in mapping.items() if k not in POLICY_KEYS}
    return policy, other


def request_policy_settings(default: Mapping[str, Any], extra_args: Mapping[str, Any] | None) -> dict:
    """The validated ``to_dict()`` settings of one request.

    ``default`` is the server's policy dict; ``extra_args`` is the request's
    ``SamplingParams.extra_args`` (keys outside POLICY_KEYS are ignored). A request
    that names a different ``kv_policy`` starts from that policy's own defaults,
    because the server's hyperparameters belong to the server's policy; only the
    server's profiling settings (``PROFILING_KEYS``) carry over, ``compress_by_chunk``
    only to a policy that evicts. Raises ValueError naming the bad
    key or value and what is allowed.
    """
    request, _ = split_policy_settings(extra_args)
    name = request.get("kv_policy", default.get("kv_policy"))
    if name == default.get("kv_policy"):
        base = dict(default)
    else:
        base = {"kv_policy": name, **{k: default.get(k, v) for k, v in PROFILING_KEYS.items()}}
        if name == "full":
            base.pop("compress_by_chunk")
    return parse_policy_config({**base, **request}).to_dict()
