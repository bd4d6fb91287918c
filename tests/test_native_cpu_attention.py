"""The runtime with vLLM's native CPU attention kernel against its torch path.

Both runtimes see the same steps (chunked prefill, prompt-end eviction, decode,
decode re-eviction) with ragged compressed per-head lists, so the native op must
give the torch path's outputs, and the observation-row scores it leaves to torch
must drive the same eviction decisions (identical kept positions).
"""

import math

import pytest
import torch

from vllm_adaptive_kv.core.attention import TorchAttention
from vllm_adaptive_kv.core.layout import FLAG_PUNCT, FLAG_SPECIAL, KVPool
from vllm_adaptive_kv.core.runtime import HeadCacheRuntime
from vllm_adaptive_kv.cpu_kernels import HAS_CPU_KERNELS

pytest.importorskip("vllm")
from vllm_adaptive_kv.plugin.cpu.attention import (  # noqa: E402
    NativeCpuAttention,
    native_cpu_attention_available,
)

L, D, BS, VOCAB = 2, 64, 32, 50


def make_runtime(native: bool, heads: int, group: int, dtype, policy: str, fused: bool | None = None, **settings):
    pool = KVPool.allocate(600, BS, D, dtype, k_transposed=native)
    flags = torch.zeros(VOCAB, dtype=torch.uint8)
    flags[0], flags[1:5] = FLAG_SPECIAL, FLAG_PUNCT
    attention = NativeCpuAttention(group, D, dtype, fused_scores=fused) if native else TorchAttention()
    return HeadCacheRuntime(pool, L, heads, group, max_reqs=8, max_model_len=1024, token_flags=flags,
                            default_settings={"kv_policy": policy, **settings}, attention=attention)


def step(runtimes, reqs, counts, starts, heads, group, dtype, gen):
    total = sum(counts)
    # strided token rows, as vLLM hands them over: column slices of one fused qkv output
    qkv = torch.randn(L, total, (heads * group + 2 * heads) * D, generator=gen).to(dtype)
    q, k, v = (part.unflatten(-1, (-1, D)) for part in qkv.split([heads * group * D, heads * D, heads * D], -1))
    pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])
    token_ids = torch.randint(0, VOCAB, (total,), generator=gen)
    outs = []
    for rt in runtimes:
        meta = rt.plan_step(reqs, counts, pos, token_ids)
        rt.last_plan = meta.path
        out = torch.stack([rt.attend(layer, q[layer], k[layer], v[layer], torch.empty_like(q[layer]), meta,
                                     1 / math.sqrt(D)).clone() for layer in range(L)])
        outs.append((out, rt.finish_step(meta)))
    return outs


def kept_positions(rt, req):
    row = rt.rows[req]
    lens = rt.cache.lens[row]
    result = []
    for layer in range(L):
        for head in range(lens.shape[1]):
            n = int(lens[layer, head])
            pages = rt.cache.table[row, layer, head, : math.ceil(n / BS)].long()
            result.append(rt.pool.slot_pos[pages].reshape(-1)[:n].tolist())
    return result


def test_native_available_for_the_embedded_shapes():
    assert native_cpu_attention_available(32, 64)
    assert not native_cpu_attention_available(16, 64)  # the kernel needs multiples of 32


@pytest.mark.parametrize("heads,group", [(3, 3), (2, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("policy,settings", [("fastgen", {"recovery_ratio": 0.6, "observation_window": 24}),
                                             ("h2o", {"budget_ratio": 0.4}), ("full", {}),
                                             # a's first chunk is evicted (and its window scored) on its own
                                             ("fastgen", {"recovery_ratio": 0.6, "observation_window": 24,
                                                          "compress_by_chunk": True})])
def test_native_matches_torch_path(heads, group, dtype, tol, policy, settings):
    check_native_matches_torch_path(heads, group, dtype, tol, policy, settings, fused=None)


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="vllm_adaptive_kv._C is not built: the fallback is the default")
def test_torch_scoring_fallback_matches_torch_path():
    # without the C++ kernel, vLLM's kernel attends every list and torch scores them
    check_native_matches_torch_path(3, 3, torch.bfloat16, 3e-2, "fastgen",
                                    {"recovery_ratio": 0.6, "observation_window": 24}, fused=False)


def check_native_matches_torch_path(heads, group, dtype, tol, policy, settings, fused):
    gen = torch.Generator().manual_seed(heads * 10 + group)
    torch_rt = make_runtime(False, heads, group, dtype, policy, **settings)
    native_rt = make_runtime(True, heads, group, dtype, policy, fused=fused, **settings)
    fused_layers = fused_spans = mixed_fused = 0
    for rt in (torch_rt, native_rt):
        rt.add("a", prompt_len=150)
        rt.add("b", prompt_len=70)
    plan = [(["a", "b"], [100, 70], [0, 0]),  # b's prompt ends: profile + evict b
            (["a", "b"], [50, 1], [100, 70])]  # a's prompt ends, b decodes
    plan += [(["b", "a"], [1, 1], [71 + i, 150 + i]) for i in range(BS + 3)]  # decode + re-eviction
    for reqs, counts, starts in plan:
        (want, want_report), (got, got_report) = step((torch_rt, native_rt), reqs, counts, starts,
                                                      heads, group, dtype, gen)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        assert got_report.requests == want_report.requests
        fused_layers += sum(layer.scored is not None for layer in native_rt.last_plan.layers)
        if sum(counts) > len(counts):  # prefill tokens: vLLM's kernel attends every sequence
            assert all(layer.query_rows is None for layer in native_rt.last_plan.layers)
            mixed_fused += sum(layer.scored is not None for layer in native_rt.last_plan.layers)
        fused_spans += native_rt.last_plan.span_lists is not None
    for req in ("a", "b"):
        assert kept_positions(native_rt, req) == kept_positions(torch_rt, req)
    # compress_by_chunk: a's first chunk (100 of 150 tokens) ended in an eviction on both paths
    chunked = int(settings.get("compress_by_chunk", False))
    assert native_rt.chunk_evictions == torch_rt.chunk_evictions == chunked
    # the C++ kernels attended and scored the scoring policies' decode lists, and scored
    # their prompt windows, whenever they are built
    fused = native_rt.attention.fused_scores and policy != "full"
    assert (fused_layers > 0) == fused and (fused_spans > 0) == fused
    # b decodes beside a's last chunk: its scored lists are attended twice there, ours last
    assert (mixed_fused > 0) == fused
    if policy != "full":
        held = native_rt.cache.lens[native_rt.rows["a"]].sum()
        assert held < (150 + BS + 3) * L * heads  # something was really evicted
    for rt in (torch_rt, native_rt):
        rt.release(["a", "b"])
        assert rt.pages_in_use() == 0
        rt.cache.audit()


def test_native_needs_transposed_keys():
    pool = KVPool.allocate(8, BS, D, torch.float32, k_transposed=False)
    with pytest.raises(ValueError, match="k_transposed=True"):
        HeadCacheRuntime(pool, L, 1, 1, max_reqs=2, max_model_len=64, token_flags=torch.zeros(4, dtype=torch.uint8),
                         default_settings={"kv_policy": "full"}, attention=NativeCpuAttention(1, D, torch.float32))


def test_decode_steps_allocate_no_step_buffer():
    gen = torch.Generator().manual_seed(0)
    rt = make_runtime(True, 3, 3, torch.bfloat16, "fastgen", recovery_ratio=0.6, observation_window=24)
    rt.add("a", prompt_len=150)
    rt.add("b", prompt_len=70)
    step([rt], ["a", "b"], [150, 70], [0, 0], 3, 3, torch.bfloat16, gen)
    step([rt], ["a", "b"], [1, 1], [150, 70], 3, 3, torch.bfloat16, gen)
    warm = rt.attention.buffers.allocations
    for i in range(BS + 2):  # through a decode re-eviction
        step([rt], ["a", "b"], [1, 1], [151 + i, 71 + i], 3, 3, torch.bfloat16, gen)
    assert rt.attention.buffers.allocations == warm
