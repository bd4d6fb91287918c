"""CUDA vLLM glue: the GPU worker and runner (Triton attention path, KV budget), and the
GPU backend class registered as ``AttentionBackendEnum.CUSTOM``. Imported and unit-tested
on CPU (tests/test_gpu_glue.py); never yet run on a GPU inside vLLM."""
