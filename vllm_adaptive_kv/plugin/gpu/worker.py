"""CUDA worker and model runner: vLLM's V1 GPU classes with the adaptive KV hooks.

Selected by ``engine_args`` (``worker_cls``) on CUDA when a kv policy is set. The
device-neutral step hooks are in ``plugin/runner.py``; this module adds what is
CUDA-specific:

- the attention path: the project's Triton kernels (``TritonAttention``, K stored
  ``[bs, D]``), the runtime's CUDA path;
- the runner, built by overriding ``Worker._make_model_runner`` (V1 runner only:
  the V2 runner has another API);
- the backend, registered as ``AttentionBackendEnum.CUSTOM`` before the model loads
  (``engine_args`` selects ``--attention-backend CUSTOM``);
- the KV budget: ``determine_available_memory`` reports vLLM's budget less the
  runtime's slot metadata and page tables (``core/memory.py``), which are allocated
  after vLLM sized its buffer, so ``gpu_memory_utilization`` still holds.

Written from vLLM 0.32's source and unit-tested on CPU; never yet run on a GPU.
"""

from __future__ import annotations

from typing import Mapping

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from ...core.attention import AttentionPath, TritonAttention
from ...core.memory import kv_budget
from ..runner import AdaptiveRunnerMixin, logger

GPU_BACKEND_PATH = "vllm_adaptive_kv.plugin.gpu.backend.AdaptiveGPUAttentionBackend"


class AdaptiveGPUModelRunner(AdaptiveRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner with the adaptive KV hooks."""

    def _attention_path(self, pages: torch.Tensor, query_group: int) -> AttentionPath:
        return TritonAttention()


def install_gpu_backend() -> None:
    """Point ``AttentionBackendEnum.CUSTOM`` at our backend in this (worker) process.

    ``CUSTOM`` is shared with other plugins and ``register_backend`` overwrites
    silently, so an existing registration is logged as replaced.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    try:
        previous = AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:  # CUSTOM not registered yet
        previous = None
    if previous not in (None, GPU_BACKEND_PATH):
        logger.warning("vllm-adaptive-kv: attention backend CUSTOM was %s; replaced by %s",
                       previous, GPU_BACKEND_PATH)
    else:
        logger.info("vllm-adaptive-kv: attention backend CUSTOM -> %s", GPU_BACKEND_PATH)
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND_PATH)


def kv_shape_of(kv_cache_spec: Mapping) -> dict:
    """``kv_budget``'s model arguments from the runner's per-layer KV specs (one rank).

    Every layer must have the same page; ``kv_bytes_per_slot`` is one token's K+V
    bytes in one (layer, head) page.
    """
    if not kv_cache_spec:
        raise RuntimeError("vllm-adaptive-kv: the model has no KV-cache layers, so there is no KV budget to share")
    pages = {(s.page_size_bytes, s.block_size, s.num_kv_heads) for s in kv_cache_spec.values()}
    if len(pages) != 1:
        raise RuntimeError(f"vllm-adaptive-kv needs one page shape in every layer, found "
                           f"(page_size_bytes, block_size, num_kv_heads) = {sorted(pages)}")
    page_size, block_size, num_kv_heads = pages.pop()
    if page_size % (block_size * num_kv_heads):
        raise RuntimeError(f"vllm-adaptive-kv: page_size_bytes={page_size} is not a whole number of bytes per "
                           f"(token, head) for block_size={block_size}, num_kv_heads={num_kv_heads}")
    return {"kv_bytes_per_slot": page_size // (block_size * num_kv_heads), "block_size": block_size,
            "num_layers": len(kv_cache_spec), "num_kv_heads": num_kv_heads}


class AdaptiveGPUWorker(Worker):
    """vLLM's GPU worker building ``AdaptiveGPUModelRunner`` and our attention backend."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        install_gpu_backend()  # before load_model builds the Attention layers

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError("vllm-adaptive-kv needs vLLM's V1 model runner, but use_v2_model_runner is true "
                               "(set VLLM_USE_V2_MODEL_RUNNER=0; HiSparse and watermarking force V2)")
        return AdaptiveGPUModelRunner(self.vllm_config, self.device)

    def determine_available_memory(self) -> int:
        """vLLM's KV budget less what the runtime allocates beside vLLM's buffer."""
        available = super().determine_available_memory()
        if self.cache_config.num_gpu_blocks_override is not None:
            logger.warning("vllm-adaptive-kv: num_gpu_blocks_override sets vLLM's KV buffer regardless of the "
                           "budget; the runtime's slot metadata and page tables come on top of it")
        budget = kv_budget(available, **kv_shape_of(self.model_runner.get_kv_cache_spec()),
                           max_num_seqs=self.scheduler_config.max_num_seqs,
                           max_model_len=self.model_config.max_model_len,
                           vocab_size=self.model_config.get_vocab_size())
        logger.info("vllm-adaptive-kv: KV budget %d of %d available bytes (the rest holds slot metadata and "
                    "page tables)", budget, available)
        return budget

    def adaptive_kv_state(self) -> dict:
        """For ``LLM.collective_rpc``: live requests, pages in use and the pool audit."""
        return self.model_runner.adaptive_kv_state()

    def adaptive_kv_head_policies(self) -> dict:
        """For ``LLM.collective_rpc``: per-head FastGen policies of recent requests."""
        return self.model_runner.adaptive_kv_head_policies()
