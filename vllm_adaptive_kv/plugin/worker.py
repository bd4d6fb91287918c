"""Worker and model-runner subclasses: drive ``HeadCacheRuntime`` once per step.

Selected by ``engine_args`` (``worker_cls``) only when a kv policy is set. Per
engine step, inside vLLM's V1 ``execute_model``::

    _update_states        finished / preempted / resumed requests -> runtime.release
    _build_attention_metadata
                          new requests -> runtime.add (per-request policy from
                          SamplingParams.extra_args); runtime.plan_step allocates
                          every list's slots for the step (one call, all layers)
    _model_forward        the layers attend through the backend; then
                          runtime.finish_step evicts/compacts and the report goes
                          to the connector, which sends it to the scheduler

``initialize_kv_cache`` re-views vLLM's one KV buffer as the head-page pool.
"""

from __future__ import annotations

import os
import time

import torch
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.logger import init_logger
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from ..config import parse_policy_config, request_policy_settings
from ..layout import KVPool
from ..runtime import HeadCacheRuntime
from ..timing import StepTimer, timing_enabled
from ..token_classes import build_token_flags
from .backend import AdaptiveMetadataBuilder, StepSource, pool_view
from .cpu_attention import VllmCpuPagedAttention, native_cpu_attention_available
from .engine_args import policy_settings_of

logger = init_logger("vllm.adaptive_kv")  # under vLLM's configured logger tree

CPU_BACKEND_PATH = "vllm_adaptive_kv.plugin.backend.AdaptiveCPUAttentionBackend"


class AdaptiveRunnerMixin:
    """Runner hooks; mixed in front of vLLM's (CPU or GPU) V1 model runner."""

    _adaptive_source: StepSource | None = None
    _adaptive_output = None  # the SchedulerOutput of the step being executed
    _adaptive_timer = StepTimer()  # disabled; initialize_kv_cache enables it on request
    _adaptive_step_start = 0.0

    # --- set-up ------------------------------------------------------------------

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise RuntimeError("vllm-adaptive-kv needs a single KV-cache group (one full-attention type)")
        kv_caches = [self.compilation_config.static_forward_context[n].kv_cache for n in layer_names]
        self._adaptive_source = StepSource(self._build_runtime(kv_caches, len(layer_names)),
                                           {n: i for i, n in enumerate(layer_names)})
        if timing_enabled():
            on_cuda = kv_caches[0].is_cuda
            self._adaptive_timer = StepTimer(True, torch.cuda.synchronize if on_cuda else None)
            self._adaptive_source.runtime.timer = self._adaptive_timer
        for groups in self.attn_groups:
            for group in groups:
                builder = group.get_metadata_builder()
                if isinstance(builder, AdaptiveMetadataBuilder):
                    builder.bind(self._adaptive_source)

    def _build_runtime(self, kv_caches, num_layers: int) -> HeadCacheRuntime:
        pages = pool_view(kv_caches)
        model_config = self.model_config
        num_kv_heads = kv_caches[0].shape[1]
        num_q_heads = model_config.get_num_attention_heads(self.parallel_config)
        native = _use_native_attention(pages.shape[2], pages.shape[3])
        pool = KVPool.from_kv_pages(pages, k_transposed=native)
        attention = VllmCpuPagedAttention(num_q_heads // num_kv_heads, pages.shape[3], pages.dtype) if native else None
        tokenizer = _load_tokenizer(model_config)
        flags = build_token_flags(tokenizer, model_config.get_vocab_size())
        settings = policy_settings_of(self.vllm_config)
        logger.info("vllm-adaptive-kv: %d head pages of %d tokens (%d layers x %d KV heads), policy %s, "
                    "attention %s", pool.num_pages, pool.block_size, num_layers, num_kv_heads, settings,
                    "vLLM's CPU kernel" if native else "torch")
        return HeadCacheRuntime(pool, num_layers, num_kv_heads, num_q_heads // num_kv_heads,
                                self.scheduler_config.max_num_seqs, model_config.max_model_len,
                                flags, settings, native_attention=attention)

    def adaptive_kv_state(self) -> dict:
        runtime = self._adaptive_source.runtime
        audit = runtime.cache.audit()  # raises AssertionError naming a leak / double owner
        return {"live_requests": sorted(runtime.rows), "pages_in_use": runtime.pages_in_use(),
                "num_pages": runtime.cache.num_pages, **audit}

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
        return super()._update_states(scheduler_output)

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
                runtime.add(req_id, len(state.prompt_token_ids or ()), self._request_config(state))
        counts = [int(num_scheduled[r]) for r in req_ids]
        self._adaptive_source.step = runtime.plan_step(
            req_ids, counts, self.positions[:total], self.input_ids.gpu[:total])

    def _request_config(self, state):
        extra = getattr(state.sampling_params, "extra_args", None) if state.sampling_params else None
        runtime = self._adaptive_source.runtime
        if not extra:
            return runtime.default_config
        return parse_policy_config(request_policy_settings(runtime.default_settings, extra))

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


def _use_native_attention(block_size: int, head_dim: int) -> bool:
    """vLLM's CPU kernel unless VLLM_ADAPTIVE_KV_CPU_ATTENTION=torch or the shape rules it out."""
    choice = os.environ.get(CPU_ATTENTION_ENV, "native")
    if choice not in ("native", "torch"):
        raise ValueError(f"{CPU_ATTENTION_ENV}={choice!r} is invalid: allowed values are 'native', 'torch'")
    if choice == "torch":
        return False
    if not native_cpu_attention_available(block_size, head_dim):
        logger.warning("vllm-adaptive-kv: block size %d / head_dim %d rule out vLLM's CPU attention kernel "
                       "(needs multiples of 32); using the slower torch attention", block_size, head_dim)
        return False
    return True


def _load_tokenizer(model_config):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_config.tokenizer, revision=model_config.tokenizer_revision,
                                         trust_remote_code=model_config.trust_remote_code)


class AdaptiveCPUModelRunner(AdaptiveRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with the adaptive KV hooks."""


def install_cpu_backend() -> None:
    """Point CPU_ATTN at our backend in this (worker) process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)


CPU_ATTENTION_ENV = "VLLM_ADAPTIVE_KV_CPU_ATTENTION"


class AdaptiveCPUWorker(CPUWorker):
    """CPUWorker that builds ``AdaptiveCPUModelRunner`` and our attention backend."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        install_cpu_backend()

    def adaptive_kv_state(self) -> dict:
        """For ``LLM.collective_rpc``: live requests, pages in use and the pool audit."""
        return self.model_runner.adaptive_kv_state()

    def adaptive_kv_head_policies(self) -> dict:
        """For ``LLM.collective_rpc``: per-head FastGen policies of recent requests."""
        return self.model_runner.adaptive_kv_head_policies()

    def init_device(self) -> None:
        # CPUWorker.init_device constructs the module-global CPUModelRunner; swap it
        # for the duration of the call only.
        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = AdaptiveCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original
        if not isinstance(self.model_runner, AdaptiveCPUModelRunner):
            raise RuntimeError("vllm-adaptive-kv needs the V1 CPU model runner")
