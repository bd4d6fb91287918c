"""``--kv-policy`` CLI flags and engine-argument checks, patched into vLLM's EngineArgs.

vLLM has no hook for a general plugin to add CLI flags or adjust engine settings,
so ``install_engine_arg_hooks`` wraps three ``EngineArgs`` methods at runtime:

- ``add_cli_args``: adds the "AdaptiveKV" group (``--kv-policy``, ``--kv-policy-config``);
- ``from_cli_args``: folds those flags into ``additional_config``, where the policy
  settings live from then on (it reaches the engine core and every worker);
- ``create_engine_config``: when ``additional_config`` names a ``kv_policy``,
  validates it, switches on this package's worker, KV connector and request
  validator (on CUDA also its attention backend and PIECEWISE CUDA graphs), turns
  off what cannot work with eviction, and refuses models and settings it cannot
  honour. Without ``kv_policy`` vLLM runs unchanged.

Precedence on the command line: ``--kv-policy`` > ``--additional-config`` keys >
``--kv-policy-config`` file. The stored form is ``KVPolicyConfig.to_dict()`` (every
key explicit) plus any keys of other plugins, untouched.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from typing import Any, Mapping

from ..core.config import parse_policy_config, read_policy_file, split_policy_settings
from ..core.policies import POLICY_NAMES
from .shutdown import install_request_ending_shutdown

log = logging.getLogger("vllm.adaptive_kv")  # under "vllm" so vLLM's log handler prints it

GROUP_TITLE = "AdaptiveKV"
DEFAULT_BLOCK_SIZE = 32  # vLLM's CPU attention kernel needs multiples of 32
CONNECTOR = {
    "kv_connector": "AdaptiveKVConnector",
    "kv_role": "kv_both",
    "kv_connector_module_path": "vllm_adaptive_kv.plugin.connector",
}
VALIDATOR = "vllm_adaptive_kv.plugin.validation:RequestPolicyValidator"
WORKERS = {
    "cpu": "vllm_adaptive_kv.plugin.cpu.worker.AdaptiveCPUWorker",
    "cuda": "vllm_adaptive_kv.plugin.gpu.worker.AdaptiveGPUWorker",
}
# On CUDA the worker registers our backend under this AttentionBackendEnum member.
GPU_ATTENTION_BACKEND = "CUSTOM"
OWN_BACKEND_MARK = "_adaptive_kv_attention_backend"  # on EngineArgs: the backend value we set
# Parallel modes whose KV layout or scheduling the plugin does not handle; TP is fine.
SINGLE_ONLY_PARALLELISM = (
    "pipeline_parallel_size",
    "data_parallel_size",
    "decode_context_parallel_size",
    "prefill_context_parallel_size",
)

_ORIGINALS: dict[str, Any] = {}  # EngineArgs methods as vLLM defined them
_SERVER_SETTINGS: dict | None = None  # last policy this process built an engine config for
_ERROR_HOOK_INSTALLED = False


class KVPolicyError(ValueError):
    """A kv policy setting, or an engine setting a kv policy cannot work with."""


def install_engine_arg_hooks() -> None:
    """Wrap EngineArgs.add_cli_args / from_cli_args / create_engine_config (once per process)."""
    if _ORIGINALS:
        return
    from vllm.engine.arg_utils import EngineArgs

    _ORIGINALS["add_cli_args"] = EngineArgs.add_cli_args
    _ORIGINALS["from_cli_args"] = EngineArgs.__dict__["from_cli_args"].__func__
    _ORIGINALS["create_engine_config"] = EngineArgs.create_engine_config
    # AsyncEngineArgs calls EngineArgs.add_cli_args by name and inherits the other
    # two, so patching EngineArgs covers `vllm serve`, `vllm run-batch` and `LLM`.
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_policy)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_policy)
    EngineArgs.create_engine_config = create_engine_config_with_policy


def original_create_engine_config(engine_args, *args, **kwargs):
    """vLLM's own create_engine_config, bypassing the hook (for comparisons in tests)."""
    return _ORIGINALS["create_engine_config"](engine_args, *args, **kwargs)


# --- policy settings ----------------------------------------------------------------


def requests_policy(additional_config: Any) -> bool:
    """Whether ``additional_config`` asks for a kv policy (the switch for everything here)."""
    return isinstance(additional_config, Mapping) and "kv_policy" in additional_config


def validated_settings(settings: Mapping[str, Any]) -> dict:
    """``settings`` in ``to_dict()`` form; a bad key or value raises KVPolicyError."""
    try:
        return parse_policy_config(settings).to_dict()
    except ValueError as err:
        raise KVPolicyError(str(err)) from None


def policy_settings_of(vllm_config: Any) -> dict | None:
    """The validated policy dict of a VllmConfig's ``additional_config``, or None if no policy."""
    additional = getattr(vllm_config, "additional_config", None)
    if not requests_policy(additional):
        return None
    policy, _ = split_policy_settings(additional)
    return validated_settings(policy)


def remembered_policy_settings() -> dict | None:
    """The policy of the last engine config built in this process (frontend default), or None."""
    return None if _SERVER_SETTINGS is None else dict(_SERVER_SETTINGS)


def additional_config_mapping(additional_config: Any) -> Mapping:
    """``additional_config`` as a mapping; policy settings cannot live in another type."""
    if additional_config is None or isinstance(additional_config, Mapping):
        return additional_config or {}
    raise KVPolicyError(
        f"additional_config of type {type(additional_config).__name__} cannot carry kv policy "
        "settings: allowed is a dict (JSON object)"
    )


def fold_cli_settings(name: str | None, file_settings: Mapping | None, additional_config: Any) -> dict:
    """``additional_config`` with the CLI's policy merged in and validated (other keys kept)."""
    extra, other = split_policy_settings(additional_config_mapping(additional_config))
    merged = {**(file_settings or {}), **extra}
    if name is not None:
        merged["kv_policy"] = name
    return {**other, **validated_settings(merged)}


# --- CLI ------------------------------------------------------------------------------


def policy_file_arg(path: str) -> dict:
    """argparse ``type`` of --kv-policy-config: the file's raw mapping (validated later,
    after --kv-policy and --additional-config are merged in)."""
    try:
        return read_policy_file(path)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    """Add the AdaptiveKV argument group."""
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description="Adaptive KV-cache eviction (vllm-adaptive-kv): --kv-policy, --kv-policy-config. "
        "Hyperparameters may also be given as --additional-config.<key> <value>.",
    )
    group.add_argument(
        "--kv-policy",
        choices=POLICY_NAMES,
        default=None,
        help="KV-cache eviction policy; overrides kv_policy of --kv-policy-config. "
        "Unset (and no --kv-policy-config): vLLM runs unchanged.",
    )
    group.add_argument(
        "--kv-policy-config",
        type=policy_file_arg,
        default=None,
        metavar="FILE.yaml",
        help="YAML file of policy settings (kv_policy and hyperparameters, see configs/); "
        "--kv-policy and --additional-config keys win over it.",
    )


def add_cli_args_with_policy(parser, *args, **kwargs):
    """EngineArgs.add_cli_args plus the AdaptiveKV group (added once per parser)."""
    parser = _ORIGINALS["add_cli_args"](parser, *args, **kwargs)
    if "--kv-policy" not in parser._option_string_actions:
        add_policy_args(parser)
    return parser


def from_cli_args_with_policy(cls, args: argparse.Namespace):
    """EngineArgs.from_cli_args, then --kv-policy / --kv-policy-config folded into additional_config."""
    engine_args = _ORIGINALS["from_cli_args"](cls, args)
    name = getattr(args, "kv_policy", None)
    file_settings = getattr(args, "kv_policy_config", None)
    from_flags = name is not None or file_settings is not None
    if not from_flags and not requests_policy(engine_args.additional_config):
        return engine_args
    install_error_hook()  # only the CLI comes through here, so errors may print as one line
    if from_flags:
        engine_args.additional_config = fold_cli_settings(name, file_settings, engine_args.additional_config)
    return engine_args


def install_error_hook() -> None:
    """Print an uncaught KVPolicyError as one line (exit status stays 1); others go to the old hook."""
    global _ERROR_HOOK_INSTALLED
    if _ERROR_HOOK_INSTALLED:
        return
    _ERROR_HOOK_INSTALLED = True
    previous = sys.excepthook

    def print_policy_error(exc_type, exc, tb):
        if issubclass(exc_type, KVPolicyError):
            print(f"vllm-adaptive-kv: error: {exc}", file=sys.stderr, flush=True)
        else:
            previous(exc_type, exc, tb)

    sys.excepthook = print_policy_error


# --- create_engine_config ------------------------------------------------------------


def create_engine_config_with_policy(self, *args, **kwargs):
    """EngineArgs.create_engine_config; with a kv policy, set up the plugin and refuse what it cannot honour."""
    global _SERVER_SETTINGS
    if not requests_policy(self.additional_config):
        return _ORIGINALS["create_engine_config"](self, *args, **kwargs)
    settings = normalize_additional_config(self)
    prepare_engine_args(self, settings["kv_policy"])
    vllm_config = _ORIGINALS["create_engine_config"](self, *args, **kwargs)
    check_engine_config(vllm_config, settings["kv_policy"])
    _SERVER_SETTINGS = settings
    install_request_ending_shutdown()  # SIGTERM under load ends `vllm serve` (plugin/shutdown.py)
    return vllm_config


def normalize_additional_config(engine_args) -> dict:
    """Validate the policy keys of ``additional_config`` and store them in ``to_dict()`` form."""
    policy, other = split_policy_settings(engine_args.additional_config)
    settings = validated_settings(policy)
    engine_args.additional_config = {**other, **settings}
    return settings


def prepare_engine_args(engine_args, name: str) -> None:
    """Set the EngineArgs fields a kv policy needs (before vLLM builds its config)."""
    refuse_unsupported_args(engine_args, name)
    engine_args.block_size = checked_block_size(engine_args.block_size, name)
    engine_args.enable_prefix_caching = without_prefix_caching(engine_args.enable_prefix_caching, name)
    engine_args.async_scheduling = without_async_scheduling(engine_args.async_scheduling, name)
    engine_args.kv_transfer_config = connector_config()
    engine_args.worker_cls = worker_class(engine_args.worker_cls, name)
    engine_args.logits_processors = with_validator(engine_args.logits_processors)
    use_v1_model_runner()
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        engine_args.attention_backend = GPU_ATTENTION_BACKEND
        setattr(engine_args, OWN_BACKEND_MARK, GPU_ATTENTION_BACKEND)  # a second build accepts it
        engine_args.compilation_config = piecewise_cudagraphs(engine_args, name)


def refuse_unsupported_args(engine_args, name: str) -> None:
    """Refuse engine settings that clash with eviction or with the plugin's connector slot."""
    if engine_args.speculative_config is not None:
        raise refusal("speculative decoding (speculative_config)", name, "no --speculative-config")
    if engine_args.kv_transfer_config is not None and not is_own_connector(engine_args.kv_transfer_config):
        raise refusal(
            "kv_transfer_config", name, "no --kv-transfer-config (vllm-adaptive-kv uses the KV-connector slot)"
        )
    if engine_args.kv_offloading_size is not None:
        raise refusal(f"kv_offloading_size={engine_args.kv_offloading_size}", name, "no --kv-offloading-size")
    check_kv_cache_dtype(engine_args.kv_cache_dtype, name)
    check_attention_backend(engine_args, name)


def refusal(what: str, name: str, allowed: str) -> KVPolicyError:
    """One-line error: ``<what> is not supported with kv_policy=<name>: allowed is <allowed>``."""
    return KVPolicyError(f"{what} is not supported with kv_policy={name!r}: allowed is {allowed}")


def check_kv_cache_dtype(cache_dtype: str, name: str) -> None:
    # The plugin's kernels read and compact KV in the model dtype; they do not dequantize.
    if cache_dtype != "auto":
        raise refusal(f"kv_cache_dtype={cache_dtype!r}", name, "kv_cache_dtype='auto'")


def check_attention_backend(engine_args, name: str) -> None:
    """Refuse a user-chosen attention backend on every platform: the plugin sets its own.

    ``auto`` (no choice) passes, and so does the value an earlier build of the same
    EngineArgs set on CUDA.
    """
    chosen = backend_label(engine_args.attention_backend)
    own = getattr(engine_args, OWN_BACKEND_MARK, None)
    if chosen is not None and str(chosen).lower() != "auto" and chosen != own:
        raise refusal(f"attention_backend={chosen!r}", name,
                      "no --attention-backend (vllm-adaptive-kv sets its own attention backend)")
    config = engine_args.attention_config
    for field in ("backend", "backend_per_kind"):
        value = config.get(field) if isinstance(config, Mapping) else getattr(config, field, None)
        if value:
            shown = ({k: backend_label(v) for k, v in value.items()} if isinstance(value, Mapping)
                     else backend_label(value))
            raise refusal(f"attention_config.{field}={shown!r}", name,
                          f"no attention_config.{field} (vllm-adaptive-kv sets its own attention backend)")


def backend_label(value: Any) -> Any:
    """An attention backend as the user wrote it: the CLI gives a string, the Python API may give the enum."""
    return getattr(value, "name", value)


def piecewise_cudagraphs(engine_args, name: str):
    """The CompilationConfig with PIECEWISE CUDA graphs unless --enforce-eager (CUDA only).

    Our metadata builder reports no CUDA-graph support, so attention runs eagerly
    between the captured pieces; a FULL mode is refused (vLLM would fail later).
    Setting PIECEWISE spares vLLM's downgrade warning.
    """
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    config = engine_args.compilation_config
    if isinstance(config, Mapping):
        config = CompilationConfig(**config)
    mode = config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise refusal(f"cudagraph_mode={mode.name}", name,
                      "cudagraph_mode PIECEWISE or NONE, or --enforce-eager (the adaptive attention runs "
                      "eagerly between CUDA-graph pieces)")
    if mode is None and not engine_args.enforce_eager:
        config = copy.deepcopy(config)
        config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    return config


def checked_block_size(block_size: int | None, name: str) -> int:
    """32 when unset; a user's value must be a power of two >= 16 (head pages tile blocks)."""
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    if block_size < 16 or block_size & (block_size - 1):
        raise KVPolicyError(
            f"block_size={block_size} is invalid with kv_policy={name!r}: allowed values are powers of two >= 16"
        )
    return block_size


def without_prefix_caching(enabled: bool | None, name: str) -> bool:
    # Evicted tokens leave holes in blocks, so blocks can no longer be shared by prefix.
    if enabled is not False:
        log.warning("kv_policy=%r: prefix caching is turned off (evicted KV blocks cannot be shared)", name)
    return False


def without_async_scheduling(enabled: bool | None, name: str) -> bool:
    # Eviction feedback from the worker must reach the scheduler before its next step.
    if enabled:
        log.warning("kv_policy=%r: async scheduling is turned off (eviction feedback must not lag a step)", name)
    return False


def connector_config():
    """The KVTransferConfig that installs this package's connector."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**CONNECTOR)


def is_own_connector(kv_transfer_config: Any) -> bool:
    """Whether a kv_transfer_config (object or dict) is the one ``connector_config`` makes."""
    def field(key):
        if isinstance(kv_transfer_config, Mapping):
            return kv_transfer_config.get(key)
        return getattr(kv_transfer_config, key, None)

    return all(field(key) == value for key, value in CONNECTOR.items())


def worker_class(worker_cls: str, name: str) -> str:
    """This package's worker for the current platform; a user's own worker is refused."""
    from vllm.platforms import current_platform

    platform = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None
    if platform is None:
        device = getattr(current_platform, "device_name", "unknown")
        raise refusal(f"platform {device!r}", name, "cpu or cuda")
    if worker_cls not in ("auto", WORKERS[platform]):
        raise refusal(f"worker_cls={worker_cls!r}", name, "worker_cls='auto' (vllm-adaptive-kv sets its own)")
    return WORKERS[platform]


def with_validator(logits_processors: list | None) -> list:
    """The user's logits processors plus the request-settings validator (once)."""
    processors = list(logits_processors or [])
    if VALIDATOR not in processors:
        processors.append(VALIDATOR)
    return processors


def use_v1_model_runner() -> None:
    # The runner mixin targets vLLM's V1 model runner, and on CUDA vLLM picks V2 by
    # default when Triton is present. Engine processes inherit os.environ; the GPU
    # worker also refuses a V2 runner (HiSparse and watermarking force V2).
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


# --- checks on the built VllmConfig ------------------------------------------------------


def check_engine_config(vllm_config, name: str) -> None:
    """Refuse what vLLM resolved that a kv policy cannot honour (model, parallelism, cache dtype)."""
    check_model_features(vllm_config.model_config, name)
    check_parallelism(vllm_config.parallel_config, name)
    check_kv_cache_dtype(vllm_config.cache_config.cache_dtype, name)
    # A speculator checkpoint turns speculative decoding on by itself.
    if vllm_config.speculative_config is not None:
        raise refusal("speculative decoding (speculative_config)", name, "no --speculative-config")


def check_model_features(model_config, name: str) -> None:
    """Refuse models whose attention the plugin's head pages do not model."""
    problem = model_feature_problem(model_config)
    if problem is not None:
        raise KVPolicyError(
            f"model {model_config.model!r} uses {problem}, which kv_policy={name!r} does not support: "
            "allowed are decoder-only models with full attention in every layer"
        )


def model_feature_problem(model_config) -> str | None:
    """What about a model rules it out, or None."""
    if model_config.use_mla:
        return "MLA attention (use_mla=True)"
    if model_config.is_encoder_decoder:
        return "an encoder-decoder architecture (is_encoder_decoder=True)"
    if model_config.is_attention_free:
        return "no attention (is_attention_free=True)"
    if model_config.is_hybrid:
        return "hybrid attention/state-space layers (is_hybrid=True)"
    window = sliding_window_of(model_config)
    if window is not None:
        return f"sliding-window attention (sliding_window={window}; --disable-sliding-window turns it off)"
    return None


def sliding_window_of(model_config) -> int | None:
    """The sliding window a model really uses, or None.

    A ``sliding_window`` in the HF config counts unless ``layer_types`` says no layer
    slides (as vLLM's create_engine_config treats it).
    """
    window = model_config.get_sliding_window()
    layer_types = getattr(model_config.hf_text_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def check_parallelism(parallel_config, name: str) -> None:
    """Allow tensor parallelism only; PP/DP/DCP/PCP split KV in ways the plugin does not track."""
    for setting in SINGLE_ONLY_PARALLELISM:
        value = getattr(parallel_config, setting, 1)
        if value > 1:
            raise refusal(f"{setting}={value}", name, f"{setting}=1 (tensor_parallel_size may be any)")
