"""vllm-adaptive-kv: FastGen adaptive KV-cache eviction with per-head paging.

Layers, each a folder (docs/design.md): ``triton_kernels`` (the kernels and their
torch references) and ``core`` (policies, profiler, paging, the step runtime and
its attention paths) import no vLLM; ``plugin`` is the vLLM glue (device-neutral
parts, and ``plugin/cpu`` for the CPU worker); ``apps`` are the command-line tools;
``model`` prepares the embedded model.
"""

__version__ = "0.1.0"
