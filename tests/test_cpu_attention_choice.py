"""VLLM_ADAPTIVE_KV_CPU_ATTENTION: the CPU worker's attention path, chosen once at start-up.

No engine: the choice is a plain function of the environment and the pool's shape.
"""

import pytest
import torch

pytest.importorskip("vllm")
from vllm_adaptive_kv.core.attention import TorchAttention, TritonAttention  # noqa: E402
from vllm_adaptive_kv.plugin.cpu import worker  # noqa: E402

ENV = "VLLM_ADAPTIVE_KV_CPU_ATTENTION"


def choose(monkeypatch, value, block_size=32, head_dim=64):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    return worker.cpu_attention_path(block_size, head_dim, 3, torch.float32)


def test_default_and_explicit_choices(monkeypatch):
    native = choose(monkeypatch, None)
    assert native.name == "vllm-cpu-kernel" and native.k_transposed
    assert choose(monkeypatch, "").name == "vllm-cpu-kernel"  # empty means the default
    assert isinstance(choose(monkeypatch, "torch"), TorchAttention)
    triton_path = choose(monkeypatch, "triton")  # conftest runs the kernels interpreted on CPU
    assert isinstance(triton_path, TritonAttention) and not triton_path.k_transposed
    assert triton_path.kernel_impl == "triton"


def test_native_falls_back_to_torch_when_the_shape_rules_it_out(monkeypatch):
    assert isinstance(choose(monkeypatch, "native", block_size=16), TorchAttention)


def test_unknown_value_names_the_allowed_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"VLLM_ADAPTIVE_KV_CPU_ATTENTION='cuda' is invalid: allowed values are "
                                         r"'native', 'torch', 'triton'"):
        choose(monkeypatch, "cuda")


def test_triton_without_the_interpreter_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(worker, "is_interpreted", lambda kernel: False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 in the environment before starting vLLM"):
        choose(monkeypatch, "triton")
