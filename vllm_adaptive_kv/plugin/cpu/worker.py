"""CPU worker and model runner: vLLM's CPU classes with the adaptive KV hooks.

Selected by ``engine_args`` (``worker_cls``) only when a kv policy is set. The
device-neutral step hooks are in ``plugin/runner.py``; this module adds what is
CPU-specific: the attention path, the backend registration and the runner swap.

``VLLM_ADAPTIVE_KV_CPU_ATTENTION`` picks the path once, at start-up:

    native   vLLM's CPU attention kernel (default; block size and head_dim multiples of 32)
    torch    the kernels' torch reference (any shape; slower)
    triton   the Triton kernels in Triton's interpreter: exactly the CUDA attention
             path (write_kv, paged attention with scores, compaction), run inside
             vLLM on CPU to prove it there. Very slow; needs TRITON_INTERPRET=1 set
             before vLLM starts (Triton fixes interpretation when a kernel is defined).
"""

from __future__ import annotations

import os

import torch
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from ...core.attention import AttentionPath, TorchAttention, TritonAttention
from ...triton_kernels import HAS_TRITON
from ...triton_kernels._triton import is_interpreted
from ...triton_kernels.paged_attention import _paged_attention_kernel
from ..runner import AdaptiveRunnerMixin, logger
from .attention import NativeCpuAttention, native_cpu_attention_available

CPU_BACKEND_PATH = "vllm_adaptive_kv.plugin.cpu.backend.AdaptiveCPUAttentionBackend"
CPU_ATTENTION_ENV = "VLLM_ADAPTIVE_KV_CPU_ATTENTION"
CPU_ATTENTION_CHOICES = ("native", "torch", "triton")


def cpu_attention_path(block_size: int, head_dim: int, query_group: int, dtype: torch.dtype) -> AttentionPath:
    """vLLM's CPU kernel unless VLLM_ADAPTIVE_KV_CPU_ATTENTION=torch or the shape rules it out."""
    choice = os.environ.get(CPU_ATTENTION_ENV) or "native"  # unset or empty: the default
    if choice not in CPU_ATTENTION_CHOICES:
        raise ValueError(f"{CPU_ATTENTION_ENV}={choice!r} is invalid: allowed values are "
                         + ", ".join(repr(c) for c in CPU_ATTENTION_CHOICES))
    if choice == "torch":
        return TorchAttention()
    if choice == "triton":
        check_triton_interpreter()
        return TritonAttention()
    if not native_cpu_attention_available(block_size, head_dim):
        logger.warning("vllm-adaptive-kv: block size %d / head_dim %d rule out vLLM's CPU attention kernel "
                       "(needs multiples of 32); using the slower torch attention", block_size, head_dim)
        return TorchAttention()
    return NativeCpuAttention(query_group, head_dim, dtype)


def check_triton_interpreter() -> None:
    """The Triton path on CPU runs only in Triton's interpreter; say how to get it."""
    if not HAS_TRITON:
        raise RuntimeError(f"{CPU_ATTENTION_ENV}=triton needs the triton package: pip install triton")
    if not is_interpreted(_paged_attention_kernel):
        raise RuntimeError(f"{CPU_ATTENTION_ENV}=triton runs the Triton kernels in Triton's interpreter on "
                           "CPU: set TRITON_INTERPRET=1 in the environment before starting vLLM")


class AdaptiveCPUModelRunner(AdaptiveRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with the adaptive KV hooks."""

    def _attention_path(self, pages: torch.Tensor, query_group: int) -> AttentionPath:
        return cpu_attention_path(pages.shape[2], pages.shape[3], query_group, pages.dtype)


def install_cpu_backend() -> None:
    """Point CPU_ATTN at our backend in this (worker) process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)


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
