"""The pure core: pool layout, paging, policies, profiler, settings, token classes,
timing, and the worker-side step runtime (its step objects and attention paths).
Nothing under this folder imports vLLM (tests/test_core_no_vllm.py walks it); it
builds on ``triton_kernels`` only."""
