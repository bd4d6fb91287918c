"""Shared pytest setup.

Triton fixes interpreter vs compiled mode when a ``@triton.jit`` decorator runs (at
import of vllm_adaptive_kv.triton_kernels), so TRITON_INTERPRET must be set here,
before any test module imports the kernels. Without CUDA the kernels then run in
the Triton interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- the embedded model (vllm_adaptive_kv.model) -----------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The prepared SmolLM2-135M-Instruct Hugging Face folder (converted once per machine,
    cached under $VLLM_ADAPTIVE_KV_CACHE or ~/.cache/vllm-adaptive-kv)."""
    from vllm_adaptive_kv.model import prepare_model

    return prepare_model("smollm2")
