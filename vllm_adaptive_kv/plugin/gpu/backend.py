"""GPU attention backend: the adaptive declarations on vLLM's bare ``AttentionBackend``.

Not a FlashAttention subclass: its block sizes, dtypes and CUDA-graph settings would
leak in. Everything it declares beyond the shared ``AdaptiveBackendMixin`` (block
sizes 16-256, KV write inside ``forward``, our spec, no sliding window) is:

- ``get_name() == "CUSTOM"``: vLLM's Attention layer looks the name up in
  ``AttentionBackendEnum``, and the worker registers this class as ``CUSTOM``;
- dtypes fp16, bf16 and fp32 (the Triton kernels take all three; vLLM's default is
  fp16/bf16 only);
- the LBHNC cache layout, like the CPU backend, so vLLM's per-layer views and our head
  pages are the same bytes as on CPU (``pool_view``).

The metadata builder reports no CUDA-graph support (vLLM's default, inherited), so
vLLM runs PIECEWISE graphs with this attention eager between the pieces.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.kv_cache_interface import KVCacheLayout

from ..backend import AdaptiveBackendMixin

BACKEND_NAME = "CUSTOM"  # the AttentionBackendEnum member the worker registers us as


class AdaptiveGPUAttentionBackend(AdaptiveBackendMixin, AttentionBackend):
    """Head-page attention for the CUDA worker (Triton kernels via ``HeadCacheRuntime``)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)
