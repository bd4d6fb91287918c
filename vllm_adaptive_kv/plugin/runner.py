"""The model-runner hooks, device-neutral: drive ``HeadCacheRuntime`` once per step.

Mixed in front of vLLM's V1 model runner (``plugin/cpu/worker.py`` puts it before
``CPUModelRunner``, ``plugin/gpu/worker.py`` before ``GPUModelRunner``). Per engine
step, inside vLLM's ``execute_model``::

    _update_states        finished / preempted / resumed requests -> runtime.release;
                          a step with no tokens (the engine going idle) reports the
                          pool at once and audits it when no request is left
    _build_attention_metadata
                          new requests -> runtime.add (per-request policy from
                          SamplingParams.extra_args); runtime.plan_step allocates
                          every list's slots for the step (one call, all layers)
    _model_forward        the layers attend through the backend; then
                          runtime.finish_step evicts/compacts and the report goes
                          to the connector, which sends it to the scheduler

``initialize_kv_cache`` re-views vLLM's one KV buffer as the head-page pool and
asks the device part (``_attention_path``) which attention path runs over it.
"""

from __future__ import annotations

import os
import time

import torch
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.logger import init_logger

from ..core.attention import AttentionPath
from ..core.config import parse_policy_config, request_policy_settings
from ..core.layout import KVPool
from ..core.runtime import HeadCacheRuntime
from ..core.step import StepReport
from ..core.timing import StepTimer, timing_enabled
from ..core.token_classes import build_token_flags
from .backend import AdaptiveMetadataBuilder, StepSource, pool_view
from .engine_args import policy_settings_of

logger = init_logger("vllm.adaptive_kv")  # under vLLM's configured logger tree


class AdaptiveRunnerMixin:
    """Runner hooks; mixed in front of a vLLM V1 model runner (``CPUModelRunner``, ``GPUModelRunner``)."""

    _adaptive_source: StepSource | None = None
    _adaptive_output = None  # the SchedulerOutput of the step being executed
    _adaptive_timer = StepTimer()  # disabled; initialize_kv_cache enables it on request
    _adaptive_step_start = 0.0

    # --- set-up ------------------------------------------------------------------

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, is_profiling, *args, **kwargs)
        layer_names = check_buffer_layout(kv_cache_config)
        if is_profiling:
            # vLLM's throw-away cache for sizing CUDA graphs: no runtime (no tokenizer load,
            # no pool view keeping the buffer alive); the builders stay unbound.
            self._adaptive_source = None
            return
        kv_caches = [self.compilation_config.static_forward_context[n].kv_cache for n in layer_names]
        self._adaptive_source = StepSource(self._build_runtime(kv_caches, len(layer_names)),
                                           {n: i for i, n in enumerate(layer_names)})
        if timing_enabled():
            on_cuda = kv_caches[0].is_cuda
            self._adaptive_timer = StepTimer(True, torch.cuda.synchronize if on_cuda else None)
            self._adaptive_source.runtime.attention.timer = self._adaptive_timer
        for groups in self.attn_groups:
            for group in groups:
                builder = group.get_metadata_builder()
                if isinstance(builder, AdaptiveMetadataBuilder):
                    builder.bind(self._adaptive_source)

    def _build_runtime(self, kv_caches, num_layers: int) -> HeadCacheRuntime:
        pages = pool_view(kv_caches)
        model_config = self.model_config
        num_kv_heads = kv_caches[0].shape[1]
        query_group = model_config.get_num_attention_heads(self.parallel_config) // num_kv_heads
        attention = self._attention_path(pages, query_group)
        pool = KVPool.from_kv_pages(pages, k_transposed=attention.k_transposed)
        flags = build_token_flags(_load_tokenizer(model_config), model_config.get_vocab_size())
        settings = policy_settings_of(self.vllm_config)
        logger.info("vllm-adaptive-kv: %d head pages of %d tokens (%d layers x %d KV heads), policy %s, "
                    "attention path %s", pool.num_pages, pool.block_size, num_layers, num_kv_heads, settings,
                    attention.name)
        return HeadCacheRuntime(pool, num_layers, num_kv_heads, query_group,
                                self.scheduler_config.max_num_seqs, model_config.max_model_len,
                                flags, settings, attention)

    def _attention_path(self, pages: torch.Tensor, query_group: int) -> AttentionPath:
        """The attention path over the pool, chosen once at start-up (device part)."""
        raise NotImplementedError

    def adaptive_kv_state(self) -> dict:
        runtime = self._adaptive_source.runtime
        audit = runtime.cache.audit()  # raises AssertionError naming a leak / double owner
        return {"live_requests": sorted(runtime.rows), "pages_in_use": runtime.pages_in_use(),
                "num_pages": runtime.cache.num_pages, "attention_path": runtime.attention.name,
                "chunk_evictions": runtime.chunk_evictions, **audit}

    def adaptive_kv_head_policies(self) -> dict:
        """req_id -> [layer][kv_head] FastGen policy name, most recent requests last."""
        return dict(self._adaptive_source.runtime.head_policies)

    def _zero_block_ids(self, block_ids) -> None:
        # vLLM's block ids do not address our pages, and a slot is always written
        # before any list covers it, so there is nothing to zero.
        return None

    # --- one step -------------------------------------------------------------------

    def execute_model(self, scheduler_output, *args, **kwargs):
        self._adaptive_output = scheduler_output
        self._adaptive_step_start = time.perf_counter()
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            self._adaptive_output = None
            if self._adaptive_source is not None:
                self._adaptive_source.step = None

    def _update_states(self, scheduler_output):
        if self._adaptive_source is not None:
            gone = set(scheduler_output.finished_req_ids)
            gone |= set(scheduler_output.preempted_req_ids or ())
            gone |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)  # restart from 0
            self._adaptive_source.runtime.release(gone)
            if not scheduler_output.total_num_scheduled_tokens:
                self._report_idle_pool()
        return super()._update_states(scheduler_output)

    def _report_idle_pool(self) -> None:
        """Report the pool from a step that runs no forward pass.

        vLLM hands the workers the ids of finished and aborted requests with the
        *next* step. When nothing else runs, that step schedules no tokens: no
        forward, so no ``finish_step`` report, and without this the ``pages_free``
        gauge would show the released pages as held until another request came.
        With no live request left the whole pool must be free: audit it (cheap next
        to a step, and only when the engine goes idle).
        """
        if not has_kv_transfer_group():
            return
        runtime = self._adaptive_source.runtime
        failures = audit_idle_pool(runtime.cache) if not runtime.rows else None
        for failure in failures or ():
            logger.error("vllm-adaptive-kv: idle pool audit failed: %s", failure)
        get_kv_transfer_group().set_step_report(StepReport(pages_free=int(runtime.cache.num_free)), failures)

    def _build_attention_metadata(self, *args, **kwargs):
        if self._adaptive_output is not None and self._adaptive_source is not None:
            with self._adaptive_timer.part("plan_s"):
                self._plan_step(kwargs["num_scheduled_tokens"], kwargs["num_tokens"])
        return super()._build_attention_metadata(*args, **kwargs)

    def _plan_step(self, num_scheduled: dict, total: int) -> None:
        runtime = self._adaptive_source.runtime
        req_ids = list(self.input_batch.req_ids[: self.input_batch.num_reqs])
        for req_id in req_ids:
            if req_id not in runtime.rows:
                state = self.requests[req_id]
                runtime.add(req_id, len(state.prompt_token_ids or ()), self._request_config(req_id, state))
        counts = [int(num_scheduled[r]) for r in req_ids]
        self._adaptive_source.step = runtime.plan_step(
            req_ids, counts, self.positions[:total], self.input_ids.gpu[:total])

    def _request_config(self, req_id: str, state):
        extra = getattr(state.sampling_params, "extra_args", None) if state.sampling_params else None
        runtime = self._adaptive_source.runtime
        if not extra:
            return runtime.default_config
        try:
            settings = request_policy_settings(runtime.default_settings, extra)
            raise_test_fault(settings)
            return parse_policy_config(settings)
        except Exception as err:
            # The frontend's validator accepted these settings, so failing here is a
            # bug. Fail loudly, naming the request: vLLM then fails the engine, its
            # requests get an error and the server shuts down rather than hang.
            raise RequestPolicyError(req_id, extra, err) from err

    def _model_forward(self, *args, **kwargs):
        output = super()._model_forward(*args, **kwargs)
        source = self._adaptive_source
        if source is not None and source.step is not None:
            with self._adaptive_timer.part("evict_s"):
                report = source.runtime.finish_step(source.step)
            if self._adaptive_timer.enabled:  # the step up to its report; sampling comes after
                self._adaptive_timer.add("worker_step_s", time.perf_counter() - self._adaptive_step_start)
                report.timings = self._adaptive_timer.take()
            if has_kv_transfer_group():
                get_kv_transfer_group().set_step_report(report)
        return output


class RequestPolicyError(RuntimeError):
    """A request's kv policy settings failed inside the worker (the frontend had accepted them)."""

    def __init__(self, req_id: str, extra_args, cause: Exception) -> None:
        super().__init__(f"vllm-adaptive-kv: the kv policy settings of request {req_id} failed in the worker: "
                         f"{type(cause).__name__}: {cause} (extra_args {extra_args!r}). The frontend had "
                         "accepted them, so this is a bug in vllm-adaptive-kv: please report it")


# Tests only (tests/test_reliability_server.py): "key=value" makes the worker fail, as
# a bug would, on a request whose policy settings hold that value. Never set in use.
TEST_FAULT_ENV = "VLLM_ADAPTIVE_KV_TEST_FAULT"


def raise_test_fault(settings: dict) -> None:
    """Raise if ``VLLM_ADAPTIVE_KV_TEST_FAULT`` (``key=value``) matches ``settings``."""
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec or "=" not in spec:
        return
    key, value = spec.split("=", 1)
    if key in settings and str(settings[key]) == value:
        raise RuntimeError(f"injected test fault ({TEST_FAULT_ENV}={spec})")


def audit_idle_pool(cache) -> list[str]:
    """What is wrong with a pool that no request holds (empty list: every page free, none twice)."""
    try:
        found = cache.audit()
    except AssertionError as err:  # the audit names the page or list that broke the invariant
        return [str(err)]
    if found["free"] != cache.num_pages:
        return [f"{cache.num_pages - found['free']} of {cache.num_pages} head pages are not free "
                f"with no live request ({found['owned']} owned by a page list)"]
    return []


def check_buffer_layout(kv_cache_config) -> list[str]:
    """The layer names, after checking vLLM's KV buffer is laid out as ``pool_view`` reads it.

    One KV-cache group, one ``KVCacheTensor`` holding every layer of it in order from
    byte 0, layer-major with whole pages: ``block_stride`` = one page (a block of all
    heads of one layer) and ``layer_stride`` = one page per block. Each failure is one
    error naming what vLLM built.
    """
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise RuntimeError(f"vllm-adaptive-kv needs a single KV-cache group (one full-attention type), "
                           f"found {len(groups)}")
    layer_names = list(groups[0].layer_names)
    tensors = kv_cache_config.kv_cache_tensors
    if len(tensors) != 1:
        raise RuntimeError(f"vllm-adaptive-kv needs vLLM's KV cache in one KVCacheTensor for all layers, "
                           f"found {len(tensors)}")
    tensor = tensors[0]
    if list(tensor.layers) != layer_names:
        raise RuntimeError(f"vllm-adaptive-kv needs the KVCacheTensor to hold the group's layers in order: "
                           f"tensor layers {list(tensor.layers)}, group layers {layer_names}")
    page = groups[0].kv_cache_spec.page_size_bytes
    num_blocks = kv_cache_config.num_blocks
    expected = {"offset": 0, "block_stride": page, "layer_stride": page * num_blocks}
    for field, value in expected.items():
        found = getattr(tensor, field)
        if found != value:
            raise RuntimeError(f"vLLM's KV buffer is not layer-major whole pages: KVCacheTensor.{field}={found}, "
                               f"expected {value} (page_size_bytes={page}, num_blocks={num_blocks})")
    if tensor.size < page * num_blocks * len(layer_names):
        raise RuntimeError(f"vLLM's KV buffer is too small: KVCacheTensor.size={tensor.size}, expected at least "
                           f"{page * num_blocks * len(layer_names)} ({len(layer_names)} layers x {num_blocks} "
                           f"blocks x {page} bytes)")
    return layer_names


def _load_tokenizer(model_config):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_config.tokenizer, revision=model_config.tokenizer_revision,
                                         trust_remote_code=model_config.trust_remote_code)


