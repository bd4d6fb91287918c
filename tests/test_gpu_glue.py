"""The CUDA glue (plugin/gpu/), unit-tested on CPU: nothing here starts an engine or needs a GPU.

What is checked: the GPU classes import; the backend declares what the Triton path
takes; vLLM's KV buffer is checked as ``pool_view`` reads it (built by vLLM's own
allocation code, and by hand for each failure); the KV budget leaves room for the
runtime's tensors; and the engine-args hook sets CUDA up and refuses a user's attention
backend. The private vLLM internals the CUDA glue relies on are contract-tested with
the rest in tests/test_vllm_contract.py.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch

from vllm_adaptive_kv.core.memory import (
    ALLOCATOR_ROUNDING,
    RUNTIME_TENSORS,
    KVBudgetError,
    kv_budget,
    metadata_bytes_per_page,
    runtime_bytes,
)

BS, L, H, D = 16, 3, 2, 8


# --- the classes ------------------------------------------------------------------------


def test_gpu_classes_import_on_cpu_and_extend_vllms_v1_classes():
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_adaptive_kv.plugin.gpu.backend import AdaptiveGPUAttentionBackend
    from vllm_adaptive_kv.plugin.gpu.worker import AdaptiveGPUModelRunner, AdaptiveGPUWorker
    from vllm_adaptive_kv.plugin.runner import AdaptiveRunnerMixin

    mro = AdaptiveGPUModelRunner.__mro__
    assert mro.index(AdaptiveRunnerMixin) < mro.index(GPUModelRunner)
    assert issubclass(AdaptiveGPUWorker, Worker)
    assert issubclass(AdaptiveGPUAttentionBackend, AttentionBackend)
    assert not AdaptiveGPUAttentionBackend.__abstractmethods__
    assert "FlashAttentionBackend" not in [c.__name__ for c in AdaptiveGPUAttentionBackend.__mro__]


def test_engine_args_name_the_gpu_worker_and_backend_that_exist():
    from vllm_adaptive_kv.plugin import engine_args
    from vllm_adaptive_kv.plugin.gpu import worker

    module, name = engine_args.WORKERS["cuda"].rsplit(".", 1)
    assert module == worker.__name__ and getattr(worker, name) is worker.AdaptiveGPUWorker
    module, name = worker.GPU_BACKEND_PATH.rsplit(".", 1)
    from vllm_adaptive_kv.plugin.gpu import backend

    assert module == backend.__name__ and hasattr(backend, name)


def test_gpu_runner_attends_with_the_triton_path_over_a_row_major_pool():
    from vllm_adaptive_kv.core.attention import TritonAttention
    from vllm_adaptive_kv.plugin.gpu.worker import AdaptiveGPUModelRunner

    runner = object.__new__(AdaptiveGPUModelRunner)  # the hook reads no runner state
    path = runner._attention_path(torch.zeros(4, 2, BS, D), query_group=3)
    assert isinstance(path, TritonAttention) and path.k_transposed is False and path.kernel_impl == "triton"


# --- the backend's declarations ---------------------------------------------------------


def selector_config(**changes):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    base = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32, use_kv_connector=True)
    return AttentionSelectorConfig(**{**base, **changes})


def validate(**changes) -> list[str]:
    from vllm.platforms.interface import DeviceCapability

    from vllm_adaptive_kv.plugin.gpu.backend import AdaptiveGPUAttentionBackend

    return AdaptiveGPUAttentionBackend.validate_configuration(
        device_capability=DeviceCapability(9, 0), **selector_config(**changes)._asdict())


def test_gpu_backend_declares_what_the_triton_path_takes():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout

    from vllm_adaptive_kv.plugin.backend import (
        SUPPORTED_BLOCK_SIZES,
        AdaptiveAttentionImpl,
        AdaptiveMetadataBuilder,
    )
    from vllm_adaptive_kv.plugin.gpu.backend import AdaptiveGPUAttentionBackend as backend
    from vllm_adaptive_kv.plugin.spec import AdaptiveKVSpec

    assert backend.get_name() == "CUSTOM" and AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert backend.supports_dtype(dtype), dtype
    assert not backend.supports_dtype(torch.float64)
    assert backend.get_supported_kernel_block_sizes() == SUPPORTED_BLOCK_SIZES == [16, 32, 64, 128, 256]
    assert backend.supports_block_size(16) and not backend.supports_block_size(8)
    assert backend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert backend.forward_includes_kv_cache_update is True
    assert backend.supported_kv_cache_dtypes == ["auto"]
    assert backend.get_impl_cls() is AdaptiveAttentionImpl
    assert backend.get_builder_cls() is AdaptiveMetadataBuilder
    assert backend.get_builder_cls().get_cudagraph_support(None, None) is AttentionCGSupport.NEVER
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    assert type(backend.customize_spec(spec)) is AdaptiveKVSpec


def test_gpu_backend_validates_fp32_and_refuses_what_it_cannot_do():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert validate(dtype=dtype) == [], dtype
    assert validate(has_sliding_window=True) == ["sliding window not supported"]
    assert validate(kv_cache_dtype="fp8") == ["kv_cache_dtype not supported"]
    assert validate(block_size=8) == ["block_size not supported"]
    assert validate(use_mla=True) == ["MLA not supported"]


class Records(logging.Handler):
    """Collects log records of the plugin's logger (vLLM's loggers do not propagate to pytest)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def overrides(monkeypatch):
    """vLLM's backend registry as a scratch copy, and the plugin logger's records."""
    from vllm.v1.attention.backends import registry

    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    registry._ATTN_OVERRIDES.pop(registry.AttentionBackendEnum.CUSTOM, None)
    handler = Records()
    logger = logging.getLogger("vllm.adaptive_kv")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    yield registry, handler.records
    logger.removeHandler(handler)


def test_worker_registers_the_backend_as_custom_and_logs_a_replaced_one(overrides):
    from vllm_adaptive_kv.plugin.gpu.backend import AdaptiveGPUAttentionBackend
    from vllm_adaptive_kv.plugin.gpu.worker import install_gpu_backend

    registry, records = overrides
    install_gpu_backend()
    assert registry.AttentionBackendEnum.CUSTOM.get_class() is AdaptiveGPUAttentionBackend
    assert records[-1].levelno == logging.INFO
    registry.register_backend(registry.AttentionBackendEnum.CUSTOM, "other.plugin.Backend")
    install_gpu_backend()
    assert records[-1].levelno == logging.WARNING and "other.plugin.Backend" in records[-1].getMessage()
    assert registry.AttentionBackendEnum.CUSTOM.get_class() is AdaptiveGPUAttentionBackend


# --- the worker (no device: its state is set by hand) ----------------------------------------


def full_spec(block_size=BS, num_kv_heads=H, head_size=D, dtype=torch.float32):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)


def bare_worker(**state):
    from vllm_adaptive_kv.plugin.gpu.worker import AdaptiveGPUWorker

    worker = object.__new__(AdaptiveGPUWorker)
    worker.__dict__.update(state)
    return worker


def test_worker_refuses_the_v2_runner_and_builds_ours_otherwise(monkeypatch):
    from vllm_adaptive_kv.plugin.gpu import worker as module

    with pytest.raises(RuntimeError, match=r"needs vLLM's V1 model runner.*VLLM_USE_V2_MODEL_RUNNER=0") as caught:
        bare_worker(use_v2_model_runner=True)._make_model_runner()
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(module, "AdaptiveGPUModelRunner", lambda config, device: ("runner", config, device))
    assert bare_worker(use_v2_model_runner=False, vllm_config="cfg", device="dev")._make_model_runner() == (
        "runner", "cfg", "dev")


def test_worker_reports_vllms_budget_less_the_runtime(monkeypatch):
    from vllm.v1.worker.gpu_worker import Worker

    monkeypatch.setattr(Worker, "determine_available_memory", lambda self: 1 << 30)
    specs = {f"model.layers.{i}.self_attn.attn": full_spec(dtype=torch.bfloat16) for i in range(L)}
    worker = bare_worker(
        model_runner=types.SimpleNamespace(get_kv_cache_spec=lambda: specs),
        cache_config=types.SimpleNamespace(num_gpu_blocks_override=None),
        scheduler_config=types.SimpleNamespace(max_num_seqs=8),
        model_config=types.SimpleNamespace(max_model_len=4096, get_vocab_size=lambda: 1000))
    expected = kv_budget(1 << 30, kv_bytes_per_slot=2 * D * 2, block_size=BS, num_layers=L, num_kv_heads=H,
                         max_num_seqs=8, max_model_len=4096, vocab_size=1000)
    assert worker.determine_available_memory() == expected < 1 << 30


def test_worker_rpcs_reach_the_runner():
    runner = types.SimpleNamespace(adaptive_kv_state=lambda: {"pages_in_use": 0},
                                   adaptive_kv_head_policies=lambda: {"r": [["full"]]})
    worker = bare_worker(model_runner=runner)
    assert worker.adaptive_kv_state() == {"pages_in_use": 0}
    assert worker.adaptive_kv_head_policies() == {"r": [["full"]]}


def test_kv_shape_of_reads_one_page_shape_and_refuses_mixed_layers():
    from vllm_adaptive_kv.plugin.gpu.worker import kv_shape_of

    specs = {"a": full_spec(dtype=torch.float16), "b": full_spec(dtype=torch.float16)}
    assert kv_shape_of(specs) == {"kv_bytes_per_slot": 2 * D * 2, "block_size": BS, "num_layers": 2,
                                  "num_kv_heads": H}
    with pytest.raises(RuntimeError, match=r"one page shape in every layer, found .*\(page_size_bytes"):
        kv_shape_of({"a": full_spec(), "b": full_spec(num_kv_heads=4)})
    with pytest.raises(RuntimeError, match="no KV-cache layers"):
        kv_shape_of({})


# --- vLLM's KV buffer as pool_view reads it ------------------------------------------------


def layer_names(count=L):
    return [f"model.layers.{i}.self_attn.attn" for i in range(count)]


def vllm_kv_cache_config(layout_name="LBHNC", num_blocks=5, names=None):
    """A KVCacheConfig made by vLLM's own get_kv_cache_config_from_groups (fake VllmConfig)."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from vllm_adaptive_kv.plugin.backend import adaptive_spec

    layout = KVCacheLayout[layout_name]
    spec = adaptive_spec(full_spec())
    names = names or layer_names()
    vllm_config = types.SimpleNamespace(
        cache_config=types.SimpleNamespace(get_resolved_kv_cache_layout=lambda: layout,
                                           num_gpu_blocks_override=None, prefix_cache_retention_interval=None),
        attention_config=types.SimpleNamespace(hisparse_config=None))
    available = spec.page_size_bytes * len(names) * num_blocks + spec.page_size_bytes - 1  # a part block is unused
    return get_kv_cache_config_from_groups(vllm_config, [KVCacheGroupSpec(names, spec)], available), layout


def vllm_views(kv_cache_config, layout):
    from vllm.v1.worker.utils import allocate_kv_cache

    views = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout, [BS])
    return [views[n] for n in kv_cache_config.kv_cache_groups[0].layer_names]


def test_vllms_own_buffer_passes_the_checks_and_pages_are_its_blocks():
    from vllm_adaptive_kv.plugin.backend import pool_view
    from vllm_adaptive_kv.plugin.runner import check_buffer_layout

    config, layout = vllm_kv_cache_config(num_blocks=5)
    assert config.num_blocks == 5
    assert check_buffer_layout(config) == layer_names()
    views = vllm_views(config, layout)
    pages = pool_view(views)
    assert pages.shape == (L * 5 * H, 2, BS, D)
    layer, block, head = 2, 3, 1
    views[layer][block, head] = 7.0  # the same bytes; only we read them, as [2, bs, D]
    page = (layer * 5 + block) * H + head
    assert bool((pages[page] == 7.0).all()) and int((pages != 0).sum()) == 2 * BS * D


def test_a_token_major_buffer_is_refused_by_pool_view():
    from vllm_adaptive_kv.plugin.backend import pool_view
    from vllm_adaptive_kv.plugin.runner import check_buffer_layout

    config, layout = vllm_kv_cache_config("LBNHC")
    check_buffer_layout(config)  # same strides per block and layer; the order within a block differs
    with pytest.raises(RuntimeError, match=r"not head-major \(LBHNC\): layer 0's view has strides"):
        pool_view(vllm_views(config, layout))


def fake_config(**tensor_changes):
    """A kv_cache_config like vLLM's for L layers x 5 blocks, with one KVCacheTensor field changed."""
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, KVCacheTensor

    spec = full_spec()
    page = spec.page_size_bytes
    tensor = dict(size=page * 5 * L, layers=layer_names(), layer_stride=page * 5, block_stride=page, offset=0)
    tensor.update(tensor_changes)
    return types.SimpleNamespace(num_blocks=5, kv_cache_tensors=[KVCacheTensor(**tensor)],
                                 kv_cache_groups=[KVCacheGroupSpec(layer_names(), spec)])


@pytest.mark.parametrize("changes, message", [
    (dict(block_stride=512), r"KVCacheTensor.block_stride=512, expected 2048 \(page_size_bytes=2048"),
    (dict(layer_stride=1024), r"KVCacheTensor.layer_stride=1024, expected 10240 \(.*num_blocks=5\)"),
    (dict(offset=64), r"KVCacheTensor.offset=64, expected 0"),
    (dict(size=100), r"KVCacheTensor.size=100, expected at least 30720"),
    (dict(layers=layer_names(2)), r"hold the group's layers in order: tensor layers \[.*\], group layers"),
    (dict(layers=layer_names()[::-1]), r"hold the group's layers in order"),
])
def test_buffer_layout_refusals_name_what_vllm_built(changes, message):
    from vllm_adaptive_kv.plugin.runner import check_buffer_layout

    check_buffer_layout(fake_config())
    with pytest.raises(RuntimeError, match=message):
        check_buffer_layout(fake_config(**changes))


def test_buffer_layout_refuses_several_tensors_or_groups():
    from vllm_adaptive_kv.plugin.runner import check_buffer_layout

    config = fake_config()
    config.kv_cache_tensors = config.kv_cache_tensors * 2
    with pytest.raises(RuntimeError, match="one KVCacheTensor for all layers, found 2"):
        check_buffer_layout(config)
    config = fake_config()
    config.kv_cache_groups = config.kv_cache_groups * 3
    with pytest.raises(RuntimeError, match=r"single KV-cache group .*found 3"):
        check_buffer_layout(config)


def profiling_runner():
    """The runner mixin over a stand-in for vLLM's runner whose initialize_kv_cache only records its call."""
    from vllm_adaptive_kv.plugin.runner import AdaptiveRunnerMixin

    class VllmRunner:
        def initialize_kv_cache(self, kv_cache_config, is_profiling=False, kv_cache_allocation_context=None):
            self.called_with = (kv_cache_config, is_profiling)

    class Runner(AdaptiveRunnerMixin, VllmRunner):
        def _build_runtime(self, kv_caches, num_layers):
            raise AssertionError("the profiling pass built a runtime")

    return Runner()


def test_the_profiling_pass_builds_no_runtime_but_checks_the_layout():
    runner = profiling_runner()
    runner._adaptive_source = "left over"
    config = fake_config()
    runner.initialize_kv_cache(config, is_profiling=True)  # as _init_minimal_kv_cache_for_profiling calls it
    assert runner.called_with == (config, True) and runner._adaptive_source is None
    with pytest.raises(RuntimeError, match="KVCacheTensor.offset=64"):
        profiling_runner().initialize_kv_cache(fake_config(offset=64), is_profiling=True)


def hand_views(num_blocks=4, layers=L, extra=0):
    """Per-layer [B, H, bs, 2D] views of one buffer, laid out as vLLM's LBHNC."""
    per_layer = num_blocks * H * BS * 2 * D
    buffer = torch.zeros(per_layer * layers + extra)
    return buffer, [buffer[i * per_layer:(i + 1) * per_layer].view(num_blocks, H, BS, 2 * D) for i in range(layers)]


def test_pool_view_refusals_name_what_was_found():
    from vllm_adaptive_kv.plugin.backend import pool_view

    _, views = hand_views()
    assert pool_view(views).shape == (L * 4 * H, 2, BS, D)
    with pytest.raises(RuntimeError, match=r"layer 1's cache starts at byte 0, expected 8192"):
        pool_view([views[0], views[0], views[2]])
    with pytest.raises(RuntimeError, match="layer 1's cache starts at byte 16384, expected 8192"):
        pool_view([views[0], views[2], views[1]])
    with pytest.raises(RuntimeError, match="layer 1's cache is in another buffer"):
        pool_view([views[0], views[1].clone(), views[2]])
    with pytest.raises(RuntimeError, match=r"layer 1 is \(4, 2, 16, 8\)"):
        pool_view([views[0], views[1][..., :D], views[2]])
    with pytest.raises(RuntimeError, match=r"layer 0 has shape \(4, 2, 16\)"):
        pool_view([views[0][..., 0]])
    _, views = hand_views(extra=2 * BS * 2 * D)
    with pytest.raises(RuntimeError, match=r"26 pages in storage, expected 24 \(layers x blocks x heads\)"):
        pool_view(views)


# --- the KV budget (core/memory.py) ----------------------------------------------------------

SHAPE = dict(block_size=BS, num_layers=L, num_kv_heads=H, max_num_seqs=4, max_model_len=100, vocab_size=77)


RUNTIME_NAMES = {"_stack": "free_stack", "_table": "table", "_evicted": "evicted"}  # attribute -> accounting name


def runtime_tensors(runtime) -> dict[str, int]:
    """Bytes of every device tensor the runtime holds, one per storage, except the K/V pages (vLLM's)."""
    seen, tensors = {runtime.pool.kv_pages.untyped_storage().data_ptr()}, {}
    for owner in (runtime, runtime.cache, runtime.pool, runtime.attention):
        for name, value in vars(owner).items():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                tensors[RUNTIME_NAMES.get(name, name)] = value.untyped_storage().nbytes()
    return tensors


@pytest.mark.parametrize("num_pages", [6, 40])
def test_runtime_bytes_counts_every_tensor_the_runtime_allocates(num_pages):
    """A tensor added to (or dropped from) the runtime shows up here by name."""
    from vllm_adaptive_kv.core.attention import TritonAttention
    from vllm_adaptive_kv.core.layout import KVPool
    from vllm_adaptive_kv.core.memory import runtime_tensor_bytes
    from vllm_adaptive_kv.core.runtime import HeadCacheRuntime

    pool = KVPool.allocate(num_pages, BS, D, torch.float32)
    runtime = HeadCacheRuntime(pool, L, H, 2, max_reqs=4, max_model_len=100,
                               token_flags=torch.zeros(77, dtype=torch.uint8),
                               default_settings={"kv_policy": "full"}, attention=TritonAttention())
    assert runtime_tensors(runtime) == runtime_tensor_bytes(num_pages, **SHAPE)
    assert RUNTIME_TENSORS == len(runtime_tensors(runtime))
    assert runtime_bytes(num_pages, **SHAPE) == (sum(runtime_tensors(runtime).values())
                                                 + RUNTIME_TENSORS * ALLOCATOR_ROUNDING)
    assert runtime_bytes(num_pages, **SHAPE) - runtime_bytes(0, **SHAPE) == num_pages * metadata_bytes_per_page(BS)
    assert metadata_bytes_per_page(BS) == BS * 9 + 4


def budget_parts(available, slot=2 * D * 2, **shape):
    shape = {**SHAPE, **shape}
    budget = kv_budget(available, slot, **shape, step_workspace=0)
    block = shape["num_layers"] * shape["num_kv_heads"] * shape["block_size"] * slot
    return budget, block, shape


@pytest.mark.parametrize("available", [50 << 20, (50 << 20) + 12345, 1 << 34])
@pytest.mark.parametrize("slot, max_num_seqs, max_model_len", [(32, 4, 100), (512, 256, 32768), (256, 1, 16)])
def test_kv_budget_is_the_most_whole_blocks_that_fit_with_the_runtime(available, slot, max_num_seqs, max_model_len):
    budget, block, shape = budget_parts(available, slot, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    num_blocks, rest = divmod(budget, block)
    assert rest == 0 and num_blocks >= 1
    pages = num_blocks * shape["num_layers"] * shape["num_kv_heads"]
    assert budget + runtime_bytes(pages, **shape) <= available
    more = pages + shape["num_layers"] * shape["num_kv_heads"]
    assert budget + block + runtime_bytes(more, **shape) > available


def test_kv_budget_is_what_vllm_turns_into_blocks():
    """vLLM's own conversion of the budget gives exactly the blocks kv_budget counted."""
    from vllm_adaptive_kv.plugin.backend import adaptive_spec

    spec = adaptive_spec(full_spec())
    slot = spec.page_size_bytes // (BS * H)
    budget, block, _ = budget_parts(64 << 20, slot)
    assert block == spec.page_size_bytes * L  # vLLM's bytes per block (layer-major, no padding)
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout

    vllm_config = types.SimpleNamespace(
        cache_config=types.SimpleNamespace(get_resolved_kv_cache_layout=lambda: KVCacheLayout.LBHNC,
                                           num_gpu_blocks_override=None, prefix_cache_retention_interval=None),
        attention_config=types.SimpleNamespace(hisparse_config=None))
    config = get_kv_cache_config_from_groups(vllm_config, [KVCacheGroupSpec(layer_names(), spec)], budget)
    assert config.num_blocks == budget // block and config.kv_cache_tensors[0].size == budget


def test_kv_budget_grows_with_the_available_bytes():
    previous = 0
    for available in range(40 << 20, 48 << 20, 99991):
        budget = kv_budget(available, 32, **SHAPE, step_workspace=0)
        assert budget >= previous
        previous = budget
    assert previous > kv_budget(40 << 20, 32, **SHAPE, step_workspace=0)
    assert (kv_budget(64 << 20, 32, **SHAPE, step_workspace=0)
            >= kv_budget(64 << 20, 32, **{**SHAPE, "max_num_seqs": 64}, step_workspace=0))


def test_kv_budget_keeps_room_for_the_split_k_workspace():
    """The default budget leaves paged_attention's split-K workspace cap free."""
    from vllm_adaptive_kv.triton_kernels.paged_attention import SPLIT_WORKSPACE_BYTES

    available = 1 << 31
    without = kv_budget(available, 32, **SHAPE, step_workspace=0)
    with_room = kv_budget(available, 32, **SHAPE)
    block = L * H * BS * 32
    assert without - with_room >= SPLIT_WORKSPACE_BYTES * block // (block + L * H * metadata_bytes_per_page(BS)) - block
    assert with_room + SPLIT_WORKSPACE_BYTES + runtime_bytes(with_room // block * L * H, **SHAPE) <= available
    with pytest.raises(ValueError, match="step_workspace=-1 is invalid"):
        kv_budget(available, 32, **SHAPE, step_workspace=-1)


def test_kv_budget_refuses_when_not_even_one_block_fits():
    fixed = runtime_bytes(0, **SHAPE)
    one_block = L * H * (BS * 32 + metadata_bytes_per_page(BS))
    assert kv_budget(fixed + one_block, 32, **SHAPE, step_workspace=0) == L * H * BS * 32
    for available in (fixed + one_block - 1, fixed, 0, -5):
        with pytest.raises(KVBudgetError, match=rf"{available} bytes available for the KV cache cannot hold "
                                                rf"the runtime's tables and step workspace \({fixed} bytes for "
                                                rf"max_num_seqs=4, "
                                                rf"max_model_len=100\) plus one KV block \({one_block} bytes.*"
                                                r"raise gpu_memory_utilization"):
            kv_budget(available, 32, **SHAPE, step_workspace=0)


@pytest.mark.parametrize("name, value", [("block_size", 0), ("num_layers", -1), ("kv_bytes_per_slot", 2.5),
                                         ("max_num_seqs", True)])
def test_kv_budget_refuses_bad_shapes(name, value):
    arguments = {"kv_bytes_per_slot": 32, **SHAPE, name: value}
    with pytest.raises(ValueError, match=rf"{name}={value!r} is invalid: allowed values are positive integers"):
        kv_budget(1 << 30, **arguments)


# --- engine arguments ------------------------------------------------------------------------


@pytest.fixture
def hooks(monkeypatch):
    """The engine-args module with its hooks installed; the env var it exports is restored."""
    import vllm_adaptive_kv.plugin as plugin
    from vllm_adaptive_kv.plugin import engine_args

    plugin.register()
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    return engine_args


@pytest.fixture
def on_cuda(monkeypatch):
    """vLLM's current platform answering as CUDA (only the engine-args hook asks)."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    return current_platform


def policy_args(**kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model="no-model-is-loaded", additional_config={"kv_policy": "fastgen"}, **kwargs)


@pytest.mark.parametrize("chosen", ["FLASH_ATTN", "flash_attn", "CUSTOM", "CPU_ATTN"])
def test_a_user_chosen_attention_backend_is_refused_on_cpu(hooks, chosen):
    with pytest.raises(hooks.KVPolicyError) as caught:
        policy_args(attention_backend=chosen).create_engine_config()
    message = str(caught.value)
    assert f"attention_backend={chosen!r} is not supported with kv_policy='fastgen'" in message
    assert "sets its own attention backend" in message and "\n" not in message


def test_a_user_chosen_attention_backend_is_refused_on_cuda(hooks, on_cuda):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for chosen, shown in [("CUSTOM", "'CUSTOM'"), (AttentionBackendEnum.FLASHINFER, "'FLASHINFER'")]:
        with pytest.raises(hooks.KVPolicyError, match=f"attention_backend={shown} is not supported"):
            hooks.prepare_engine_args(policy_args(attention_backend=chosen), "fastgen")
    with pytest.raises(hooks.KVPolicyError, match=r"attention_config.backend='FLASH_ATTN' .*sets its own"):
        hooks.prepare_engine_args(policy_args(attention_config={"backend": "FLASH_ATTN"}), "fastgen")
    with pytest.raises(hooks.KVPolicyError, match=r"attention_config.backend_per_kind=\{'full_attention': "
                                                  r"'TRITON_ATTN'\} is not supported"):
        hooks.prepare_engine_args(policy_args(attention_config={"backend_per_kind": {
            "full_attention": "TRITON_ATTN"}}), "fastgen")


def test_auto_attention_backend_is_no_choice(hooks):
    hooks.check_attention_backend(policy_args(attention_backend="auto"), "fastgen")
    hooks.check_attention_backend(policy_args(), "fastgen")


def test_cuda_is_set_up_not_refused(hooks, on_cuda):
    import os

    from vllm.config.compilation import CUDAGraphMode

    engine_args = policy_args()
    hooks.prepare_engine_args(engine_args, "fastgen")
    assert engine_args.worker_cls == hooks.WORKERS["cuda"] == "vllm_adaptive_kv.plugin.gpu.worker.AdaptiveGPUWorker"
    assert engine_args.attention_backend == "CUSTOM"
    assert engine_args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    hooks.prepare_engine_args(engine_args, "fastgen")  # a second build accepts the plugin's own settings
    assert engine_args.attention_backend == "CUSTOM"


def test_cuda_cudagraph_modes(hooks, on_cuda):
    from vllm.config.compilation import CUDAGraphMode

    engine_args = policy_args(enforce_eager=True)
    hooks.prepare_engine_args(engine_args, "fastgen")
    assert engine_args.compilation_config.cudagraph_mode is None  # vLLM makes it NONE
    engine_args = policy_args(compilation_config={"cudagraph_mode": "NONE"})
    hooks.prepare_engine_args(engine_args, "fastgen")
    assert engine_args.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    for mode in ("FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"):
        with pytest.raises(hooks.KVPolicyError, match=rf"cudagraph_mode={mode} is not supported.*PIECEWISE or NONE"):
            hooks.prepare_engine_args(policy_args(compilation_config={"cudagraph_mode": mode}), "fastgen")


def test_cpu_keeps_vllms_attention_and_graph_settings(hooks):
    engine_args = policy_args()
    hooks.prepare_engine_args(engine_args, "fastgen")
    assert engine_args.worker_cls == hooks.WORKERS["cpu"]
    assert engine_args.attention_backend is None and engine_args.compilation_config.cudagraph_mode is None


def test_other_platforms_are_refused(hooks, monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)
    with pytest.raises(hooks.KVPolicyError, match=r"platform 'cpu' is not supported .*allowed is cpu or cuda"):
        hooks.worker_class("auto", "fastgen")
