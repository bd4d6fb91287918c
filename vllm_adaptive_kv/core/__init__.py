"""The pure core: policies, profiler, paging, pool layout, settings and the
worker-side runtime. Nothing under this folder imports vLLM (tests/test_core_no_vllm.py
walks it)."""
