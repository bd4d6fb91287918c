"""CPU attention backend: takes CPU_ATTN's place (same LBHNC cache layout).

Only the class declaration is CPU-specific; what it declares (block sizes, KV write
inside ``forward``, the spec that selects our block manager) is the shared
``AdaptiveBackendMixin``.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from ..backend import AdaptiveBackendMixin


class AdaptiveCPUAttentionBackend(AdaptiveBackendMixin, CPUAttentionBackend):
    """vLLM's CPU backend with the adaptive declarations in front."""
