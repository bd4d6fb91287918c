"""vllm-adaptive-kv: FastGen adaptive KV-cache eviction with per-head paging.

The core (policies, profiler, paging, token classes, kernels) imports no vLLM;
the thin vLLM glue lives in :mod:`vllm_adaptive_kv.plugin`.
"""

__version__ = "0.1.0"
