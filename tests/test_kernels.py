"""Triton kernels vs their torch references, and the references vs naive float64 loops.

Without CUDA the Triton side runs in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before the kernels are imported), so the cases are few and small
but chosen to cover: head_dim 64/128, block size 16/32, GQA ratio 1/3/8, ragged lists
with empty and single-slot heads, shuffled page tables, a pool whose element offsets
exceed 2**31, decode and causal prefill, score accumulation, fp32/bf16/fp16, and the
attention kernel's schedules: per-list score masks, split-K and query tiles.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from vllm_adaptive_kv.triton_kernels import (
    HAS_TRITON,
    compact_slots,
    paged_attention,
    paged_attention_reference,
    window_attention_colsum,
    window_attention_colsum_reference,
    write_kv,
)
from vllm_adaptive_kv.triton_kernels._triton import is_interpreted, use_triton
from vllm_adaptive_kv.triton_kernels.paged_attention import (
    MAX_SPLITS,
    _paged_attention_kernel,
    make_query_tiles,
    split_count,
)

needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not importable; only the torch references are tested"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Pages of 2 * 16 * 64 elements; this many make the pool exceed 2**31 elements, so the
# last pages are only addressable with int64 arithmetic. torch.empty leaves the memory
# untouched (not resident) and the interpreter does not copy CPU tensors.
BIG_POOL_PAGES = (1 << 20) + 256
TAIL_PAGES = 96  # the big-pool cases only use (and fill) this many pages at the end

# (output atol, output rtol) of Triton vs the torch reference, and of the reference vs
# float64. 16-bit runs also round p to the pool dtype before p @ V.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SCORE_TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}


# --------------------------------------------------------------------------- fixtures


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality that also holds for NaN poison (compares the raw bits)."""
    if a.dtype.is_floating_point:
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return torch.equal(a, b)


@dataclass
class Pool:
    kv_pages: torch.Tensor
    slot_pos: torch.Tensor
    slot_flags: torch.Tensor
    slot_score: torch.Tensor
    used: slice  # the page range the case fills and may touch

    def clone_used(self):
        """CPU copies of the used page range of every pool tensor (for comparisons)."""
        fields = (self.kv_pages, self.slot_pos, self.slot_flags, self.slot_score)
        return [t[self.used].to("cpu", copy=True) for t in fields]


def make_pool(num_pages, block_size, head_dim, dtype, gen, big=False) -> Pool:
    """Random pool; a big pool is allocated with torch.empty and only its tail is filled."""
    if big:
        num_pages = BIG_POOL_PAGES
        assert num_pages * 2 * block_size * head_dim > 2**31
        used = slice(num_pages - TAIL_PAGES, num_pages)
    else:
        used = slice(0, num_pages)
    pool = Pool(
        kv_pages=torch.empty(num_pages, 2, block_size, head_dim, dtype=dtype, device=DEVICE),
        slot_pos=torch.empty(num_pages, block_size, dtype=torch.int32, device=DEVICE),
        slot_flags=torch.empty(num_pages, block_size, dtype=torch.uint8, device=DEVICE),
        slot_score=torch.empty(num_pages, block_size, dtype=torch.float32, device=DEVICE),
        used=used,
    )
    n = used.stop - used.start
    pool.kv_pages[used] = torch.randn(n, 2, block_size, head_dim, generator=gen).to(dtype)
    # Junk metadata everywhere: a kernel reading a wrong slot would see it.
    pool.slot_pos[used] = torch.randint(0, 200, (n, block_size), generator=gen, dtype=torch.int32)
    pool.slot_flags[used] = torch.randint(0, 4, (n, block_size), generator=gen, dtype=torch.uint8)
    pool.slot_score[used] = torch.rand(n, block_size, generator=gen)
    return pool


def used_slots(pool: Pool) -> torch.Tensor:
    """Physical ids of every slot in the pool's used page range."""
    block_size = pool.kv_pages.shape[2]
    return torch.arange(pool.used.start * block_size, pool.used.stop * block_size)


@dataclass
class HeadLists:
    page_table: torch.Tensor  # [R, H, max_pages] int32 (a strided layer view)
    head_lens: torch.Tensor  # [R, H] int32 (a strided layer view)
    ctx_lens: list  # per request: original context length

    def slots(self, r, h, block_size):
        """Physical slot ids of list (r, h) in logical order."""
        n = int(self.head_lens[r, h])
        pages = self.page_table[r, h].long()
        return [int(pages[i // block_size]) * block_size + i % block_size for i in range(n)]


def random_lens(num_reqs, num_heads, block_size, gen):
    """Ragged lengths that always include an empty, a single-slot and a full-page list."""
    lens = torch.randint(2, 3 * block_size + 5, (num_reqs, num_heads), generator=gen)
    special = torch.tensor([0, 1, block_size, block_size + 1])
    flat = lens.view(-1)
    flat[: min(len(special), flat.numel())] = special[: flat.numel()]
    return lens.view(-1)[torch.randperm(flat.numel(), generator=gen)].view(num_reqs, num_heads)


def make_lists(pool: Pool, lens, gen, num_layers=2, layer=1) -> HeadLists:
    """Page tables over a random permutation of the used pool pages; writes slot_pos.

    Each list keeps a sorted random subset of its request's positions, like a list
    after eviction and compaction. The tables are layer views of [R, L, H, max_pages].
    K/V of every used slot outside the lists become NaN: kernels must never read them.
    """
    block_size = pool.kv_pages.shape[2]
    num_reqs, num_heads = lens.shape
    pages_per_list = (lens + block_size - 1) // block_size
    max_pages = int(pages_per_list.max()) + 1  # a trailing -1 column in every row
    free_pages = pool.used.start + torch.randperm(pool.used.stop - pool.used.start, generator=gen)
    assert int(pages_per_list.sum()) <= len(free_pages)
    table = torch.full((num_reqs, num_layers, num_heads, max_pages), -1, dtype=torch.int32)
    head_lens = torch.zeros(num_reqs, num_layers, num_heads, dtype=torch.int32)
    ctx_lens, next_page = [], 0
    listed = torch.zeros(pool.used.stop - pool.used.start, block_size, dtype=torch.bool)
    for r in range(num_reqs):
        ctx = int(lens[r].max()) + int(torch.randint(0, 8, (1,), generator=gen))
        ctx_lens.append(ctx)
        for h in range(num_heads):
            n, k = int(lens[r, h]), int(pages_per_list[r, h])
            table[r, layer, h, :k] = free_pages[next_page : next_page + k].int()
            next_page += k
            head_lens[r, layer, h] = n
            positions = torch.randperm(ctx, generator=gen)[:n].sort().values.int()
            for i in range(n):
                page = int(table[r, layer, h, i // block_size])
                pool.slot_pos[page, i % block_size] = positions[i]
                listed[page - pool.used.start, i % block_size] = True
    pool.kv_pages[pool.used].transpose(1, 2)[~listed.to(DEVICE)] = float("nan")
    return HeadLists(table.to(DEVICE)[:, layer], head_lens.to(DEVICE)[:, layer], ctx_lens)


@dataclass
class Queries:
    q: torch.Tensor  # [T, Hq, D]
    token_req: torch.Tensor  # [T] int32
    q_pos: torch.Tensor  # [T] int32


def make_queries(lists: HeadLists, tokens_per_req, num_q_heads, head_dim, dtype, gen) -> Queries:
    """Decode: one query at the context end. Prefill: several earlier positions too, so
    some keys are invisible and position 0 often sees nothing; token order is shuffled."""
    reqs, positions = [], []
    for r, ctx in enumerate(lists.ctx_lens):
        pos = [ctx] + [int(p) for p in torch.randint(0, ctx + 1, (tokens_per_req - 1,), generator=gen)]
        if tokens_per_req > 2:
            pos[-1] = 0
        reqs += [r] * tokens_per_req
        positions += pos
    order = torch.randperm(len(reqs), generator=gen)
    q = torch.randn(len(reqs), num_q_heads, head_dim, generator=gen).to(dtype)
    return Queries(
        q.to(DEVICE),
        torch.tensor(reqs, dtype=torch.int32)[order].to(DEVICE),
        torch.tensor(positions, dtype=torch.int32)[order].to(DEVICE),
    )


def attention_setup(seed, head_dim, block_size, group, dtype, tokens_per_req, big=False, num_heads=2):
    gen = torch.Generator().manual_seed(seed)
    lens = random_lens(3, num_heads, block_size, gen)
    num_pages = int(((lens + block_size - 1) // block_size).sum()) * 2 + 3
    pool = make_pool(num_pages, block_size, head_dim, dtype, gen, big=big)
    lists = make_lists(pool, lens, gen)
    queries = make_queries(lists, tokens_per_req, num_heads * group, head_dim, dtype, gen)
    return pool, lists, queries


# --------------------------------------------------------------------------- float64 truth


def dense_attention(pool: Pool, lists: HeadLists, queries: Queries, scale, score_lists=None, weight=None):
    """Loop-per-(token, kv head) float64 attention: (out, score_delta dict, colsum, visible counts).

    The score delta counts only lists with ``score_lists[r, h]`` (if given), each token's
    share times ``weight[t]`` (if given); colsum counts everything."""
    block_size = pool.kv_pages.shape[2]
    num_tokens, num_q_heads, head_dim = queries.q.shape
    num_heads = lists.head_lens.shape[1]
    group = num_q_heads // num_heads
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float64)
    score = {}
    colsum = torch.zeros(lists.page_table.shape[0], num_heads, lists.page_table.shape[2] * block_size,
                         dtype=torch.float64)
    visible_counts = []
    for t in range(num_tokens):
        r, qp = int(queries.token_req[t]), int(queries.q_pos[t])
        for h in range(num_heads):
            slots = lists.slots(r, h, block_size)
            pages = [s // block_size for s in slots]
            offs = [s % block_size for s in slots]
            keys = pool.kv_pages[pages, 0, offs].cpu().double()
            values = pool.kv_pages[pages, 1, offs].cpu().double()
            visible = pool.slot_pos[pages, offs].cpu() <= qp
            visible_counts.append(int(visible.sum()))
            if not visible.any():
                continue
            qg = queries.q[t, h * group : (h + 1) * group].cpu().double()
            logits = (qg @ keys.T * scale).masked_fill(~visible, -math.inf)
            probs = torch.softmax(logits, dim=-1)
            out[t, h * group : (h + 1) * group] = probs @ values
            colsum[r, h, : len(slots)] += probs.sum(0)
            if score_lists is not None and not bool(score_lists[r, h]):
                continue
            share = 1.0 if weight is None else float(weight[t])
            for i, s in enumerate(slots):
                score[s] = score.get(s, 0.0) + share * float(probs[:, i].sum())
    return out, score, colsum, visible_counts


def apply_score_delta(slot_score_before: torch.Tensor, delta: dict, used: slice, block_size: int):
    expected = slot_score_before.cpu().double().clone()
    for slot, value in delta.items():
        expected[slot // block_size - used.start, slot % block_size] += value
    return expected


# --------------------------------------------------------------------------- paged_attention

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class AttentionCase(NamedTuple):
    seed: int
    head_dim: int
    block_size: int
    group: int  # GQA ratio G = Hq / H
    dtype: torch.dtype
    tokens_per_req: int  # 1 = decode, more = causal prefill chunk
    big: bool = False  # lists live at the end of a > 2**31-element pool
    heads: int = 2  # kv heads H

    def setup(self):
        return attention_setup(self.seed, self.head_dim, self.block_size, self.group, self.dtype,
                               self.tokens_per_req, self.big, self.heads)

    @property
    def name(self):
        kind = "decode" if self.tokens_per_req == 1 else f"prefill{self.tokens_per_req}"
        return (f"{kind}-d{self.head_dim}-bs{self.block_size}-g{self.group}-h{self.heads}-"
                f"{DTYPE_NAMES[self.dtype]}" + ("-bigpool" if self.big else ""))


def random_attention_cases(count: int, seed: int):
    """Random (head_dim, block_size, group, dtype, tokens/request, kv heads) combos."""
    rng = random.Random(seed)
    return [
        AttentionCase(seed + i, rng.choice([64, 128]), rng.choice([16, 32]), rng.choice([1, 3, 8]),
                      rng.choice(list(DTYPE_NAMES)), rng.choice([1, 2, 4]), heads=rng.choice([1, 2, 3]))
        for i in range(count)
    ]


ATTENTION_CASES = [
    AttentionCase(1, 64, 16, 1, torch.float32, 1),
    AttentionCase(2, 128, 32, 3, torch.float32, 3),
    AttentionCase(3, 64, 32, 8, torch.bfloat16, 3),
    AttentionCase(4, 128, 16, 8, torch.float16, 1),
    AttentionCase(5, 64, 16, 3, torch.float16, 2, big=True),
    *random_attention_cases(6, seed=100),
]
ATTENTION_PARAMS = [pytest.param(case, id=case.name) for case in ATTENTION_CASES]


@pytest.mark.parametrize("case", ATTENTION_PARAMS)
def test_paged_attention_reference_matches_float64(case: AttentionCase):
    pool, lists, queries = case.setup()
    scale = case.head_dim**-0.5
    score_before = pool.slot_score[pool.used].clone()
    out = paged_attention_reference(queries.q, queries.token_req, queries.q_pos, lists.page_table,
                                    lists.head_lens, pool.kv_pages, pool.slot_pos, scale,
                                    slot_score=pool.slot_score)
    want_out, delta, _, visible_counts = dense_attention(pool, lists, queries, scale)
    # The case must exercise empty rows and partially visible lists.
    assert 0 in visible_counts and len(set(visible_counts)) > 2
    tol = OUT_TOL[case.dtype]
    torch.testing.assert_close(out.cpu().double(), want_out, atol=tol, rtol=tol)
    want_score = apply_score_delta(score_before, delta, pool.used, case.block_size)
    tol = SCORE_TOL[case.dtype]
    torch.testing.assert_close(pool.slot_score[pool.used].cpu().double(), want_score, atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("case", ATTENTION_PARAMS)
def test_paged_attention_triton_matches_reference(case: AttentionCase):
    pool, lists, queries = case.setup()
    used = pool.used
    score_start = pool.slot_score[used].clone()
    outs, scores = {}, {}
    for impl in ("torch", "triton"):
        pool.slot_score[used] = score_start
        out = torch.full_like(queries.q, float("nan"))  # poison: every element must be written
        paged_attention(queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
                        pool.kv_pages, pool.slot_pos, case.head_dim**-0.5, out=out,
                        slot_score=pool.slot_score, impl=impl)
        outs[impl], scores[impl] = out, pool.slot_score[used].clone()
    assert not outs["triton"].isnan().any()
    tol = OUT_TOL[case.dtype]
    torch.testing.assert_close(outs["triton"].float(), outs["torch"].float(), atol=tol, rtol=tol)
    tol = SCORE_TOL[case.dtype]
    torch.testing.assert_close(scores["triton"], scores["torch"], atol=tol, rtol=tol)
    assert not torch.equal(scores["triton"], score_start)  # scores were actually added


@needs_triton
def test_paged_attention_without_score_leaves_pool_alone():
    pool, lists, queries = attention_setup(7, 64, 16, 3, torch.float32, 2)
    before = pool.clone_used()
    out = paged_attention(queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
                          pool.kv_pages, pool.slot_pos, 0.125, impl="triton")
    ref = paged_attention_reference(queries.q, queries.token_req, queries.q_pos, lists.page_table,
                                    lists.head_lens, pool.kv_pages, pool.slot_pos, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for was, now in zip(before, pool.clone_used()):
        assert same_bits(was, now)


def test_reference_token_chunking_matches_one_chunk(monkeypatch):
    """Long prefills are gathered in token chunks; a tiny budget must not change results."""
    # The package re-exports the function under the module's name, so fetch the module itself.
    pa = importlib.import_module("vllm_adaptive_kv.triton_kernels.paged_attention")
    pool, lists, queries = AttentionCase(8, 64, 16, 3, torch.float32, 4).setup()
    args = (queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
            pool.kv_pages, pool.slot_pos, 0.125)
    one_chunk = paged_attention_reference(*args)
    one_colsum = window_attention_colsum_reference(*args)
    monkeypatch.setattr(pa, "_REFERENCE_CHUNK_ELEMS", 1)  # one token per chunk
    assert len(pa.token_chunks(len(queries.q), 10)) == len(queries.q)
    torch.testing.assert_close(paged_attention_reference(*args), one_chunk, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(window_attention_colsum_reference(*args), one_colsum, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ATTENTION_PARAMS[:4])
def test_reference_reads_transposed_keys_alike(case: AttentionCase):
    """The reference is also the runtime's torch path on a pool laid out for vLLM's CPU
    kernel (K blocks stored [D, bs]): the same tokens give the same outputs and scores."""
    pool, lists, queries = case.setup()
    args = (queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens)
    scores = {}
    outs = {}
    for k_transposed in (False, True):
        kv_pages = pool.kv_pages.clone()
        if k_transposed:  # the same K rows, stored transposed within each page
            kv_pages[:, 0] = pool.kv_pages[:, 0].transpose(-1, -2).reshape(kv_pages[:, 0].shape)
        score = pool.slot_score.clone()
        outs[k_transposed] = paged_attention_reference(*args, kv_pages, pool.slot_pos, 0.125, slot_score=score,
                                                       k_transposed=k_transposed)
        scores[k_transposed] = score
    # Same products; only the matmul's summation order may differ with the layout.
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[True], scores[False], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k_transposed=False"):
        paged_attention(*args, pool.kv_pages, pool.slot_pos, 0.125, impl="triton", k_transposed=True)


# --------------------------------------------------------------------------- window stats

WINDOW_CASES = [
    pytest.param(11, 64, 16, 3, torch.float32, id="d64-bs16-g3-fp32"),
    pytest.param(12, 128, 32, 8, torch.bfloat16, id="d128-bs32-g8-bf16"),
    pytest.param(13, 64, 32, 1, torch.float16, id="d64-bs32-g1-fp16"),
]


@pytest.mark.parametrize("impl", [pytest.param("torch", id="reference"),
                                  pytest.param("triton", id="triton", marks=needs_triton)])
@pytest.mark.parametrize("seed,head_dim,block_size,group,dtype", WINDOW_CASES)
def test_window_colsum_matches_float64(seed, head_dim, block_size, group, dtype, impl):
    pool, lists, queries = attention_setup(seed, head_dim, block_size, group, dtype, tokens_per_req=4)
    scale = head_dim**-0.5
    num_reqs, num_heads, max_pages = lists.page_table.shape
    out = torch.full((num_reqs, num_heads, max_pages * block_size + 3), float("nan"), device=DEVICE)
    window_attention_colsum(queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
                            pool.kv_pages, pool.slot_pos, scale, out=out, impl=impl)
    _, _, want, visible_counts = dense_attention(pool, lists, queries, scale)
    assert 0 in visible_counts
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out[..., : want.shape[2]].cpu().double(), want, atol=tol, rtol=tol)
    assert not out[..., want.shape[2] :].any()  # padding slots were zeroed too
    # Each window token that sees a key spreads G units of probability over its list.
    seeing = torch.tensor(visible_counts).view(-1, num_heads) > 0  # [T, H]
    per_req = torch.zeros(num_reqs, num_heads).index_add_(0, queries.token_req.cpu().long(), seeing.float())
    torch.testing.assert_close(out.sum(-1).cpu(), group * per_req, atol=1e-3, rtol=1e-4)


def test_window_colsum_reference_is_used_on_request():
    pool, lists, queries = attention_setup(14, 64, 16, 1, torch.float32, tokens_per_req=2)
    a = window_attention_colsum(queries.q, queries.token_req, queries.q_pos, lists.page_table,
                                lists.head_lens, pool.kv_pages, pool.slot_pos, 0.125, impl="torch")
    b = window_attention_colsum_reference(queries.q, queries.token_req, queries.q_pos, lists.page_table,
                                          lists.head_lens, pool.kv_pages, pool.slot_pos, 0.125)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- write_kv

WRITE_CASES = [
    pytest.param(21, 64, 16, torch.float32, False, id="d64-bs16-fp32"),
    pytest.param(22, 128, 32, torch.bfloat16, False, id="d128-bs32-bf16"),
    pytest.param(23, 64, 16, torch.float16, True, id="d64-bs16-fp16-bigpool"),
]


def write_setup(seed, head_dim, block_size, dtype, big, num_tokens=7, num_heads=3):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(40, block_size, head_dim, dtype, gen, big=big)
    # Poison the pool so that every written field is checked against its source.
    pool.kv_pages[pool.used] = float("nan")
    pool.slot_score[pool.used] = float("nan")
    pool.slot_pos[pool.used] = -7
    pool.slot_flags[pool.used] = 0xEE
    all_slots = used_slots(pool)
    slots = all_slots[torch.randperm(len(all_slots), generator=gen)[: num_tokens * num_heads]]
    slots = slots.view(num_tokens, num_heads).clone()
    slots[torch.rand(num_tokens, num_heads, generator=gen) < 0.25] = -1
    slots[0, 0] = -1
    key = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    # A strided value (heads interleaved with junk) checks the wrappers' stride handling.
    value = torch.randn(num_tokens, 2 * num_heads, head_dim, generator=gen).to(dtype)[:, ::2]
    positions = torch.randint(0, 10_000, (num_tokens,), generator=gen, dtype=torch.int32)
    flags = torch.randint(0, 4, (num_tokens,), generator=gen, dtype=torch.uint8)
    args = [t.to(DEVICE) for t in (key, value, slots, positions, flags)]
    return pool, args


@pytest.mark.parametrize("impl", [pytest.param("torch", id="reference"),
                                  pytest.param("triton", id="triton", marks=needs_triton)])
@pytest.mark.parametrize("seed,head_dim,block_size,dtype,big", WRITE_CASES)
def test_write_kv_writes_exactly_the_mapped_slots(seed, head_dim, block_size, dtype, big, impl):
    pool, (key, value, slots, positions, flags) = write_setup(seed, head_dim, block_size, dtype, big)
    before = pool.clone_used()
    write_kv(key, value, slots, positions, flags, pool.kv_pages, pool.slot_pos, pool.slot_flags,
             pool.slot_score, impl=impl)
    after = pool.clone_used()
    key, value, slots, positions, flags = (t.cpu() for t in (key, value, slots, positions, flags))
    written = torch.zeros_like(before[1], dtype=torch.bool)
    start = pool.used.start
    for t in range(slots.shape[0]):
        for h in range(slots.shape[1]):
            s = int(slots[t, h])
            if s < 0:
                continue
            page, off = s // block_size - start, s % block_size
            written[page, off] = True
            assert torch.equal(after[0][page, 0, off], key[t, h])
            assert torch.equal(after[0][page, 1, off], value[t, h])
            assert after[1][page, off] == positions[t]
            assert after[2][page, off] == flags[t]
            assert after[3][page, off] == 0.0
    assert written.any() and not written.all()
    # Skipped (-1) and unmapped slots keep their poison.
    assert after[0].transpose(1, 2)[~written].isnan().all() and after[3][~written].isnan().all()
    assert torch.equal(after[1][~written], before[1][~written])
    assert torch.equal(after[2][~written], before[2][~written])


# --------------------------------------------------------------------------- compaction


def plan_moves(lists: HeadLists, keep: torch.Tensor, block_size: int, junk_slots: torch.Tensor,
               gen: torch.Generator):
    """Planner stand-in: per list, kept slot old_i moves to new_i (its rank) when they differ.

    Entries past num_moves hold moves between random ``junk_slots``, which an
    implementation that ignores num_moves would apply.
    Returns (src_slot, dst_slot [M, max_moves] int64, num_moves [M] int32, kept pairs)."""
    num_reqs, num_heads = lists.head_lens.shape
    rows, kept_pairs = [], []
    for r in range(num_reqs):
        for h in range(num_heads):
            slots = lists.slots(r, h, block_size)
            kept = [i for i in range(len(slots)) if keep[r, h, i]]
            kept_pairs += [(slots[old], slots[new]) for new, old in enumerate(kept)]
            rows.append([(slots[old], slots[new]) for new, old in enumerate(kept) if new != old])
    max_moves = max(len(row) for row in rows) + 2  # slack entries must be ignored
    junk = junk_slots[torch.randint(0, len(junk_slots), (2, len(rows), max_moves), generator=gen)]
    src, dst = junk[0].clone(), junk[1].clone()
    for m, row in enumerate(rows):
        if row:
            src[m, : len(row)] = torch.tensor([s for s, _ in row])
            dst[m, : len(row)] = torch.tensor([d for _, d in row])
    num_moves = torch.tensor([len(row) for row in rows], dtype=torch.int32)
    return src.to(DEVICE), dst.to(DEVICE), num_moves.to(DEVICE), kept_pairs


COMPACT_CASES = [
    pytest.param(31, 64, 16, torch.float32, False, 0.5, id="d64-bs16-fp32-half"),
    pytest.param(32, 128, 32, torch.bfloat16, False, 0.3, id="d128-bs32-bf16-sparse"),
    pytest.param(33, 64, 16, torch.float16, True, 0.7, id="d64-bs16-fp16-bigpool"),
]


@pytest.mark.parametrize("impl", [pytest.param("torch", id="reference"),
                                  pytest.param("triton", id="triton", marks=needs_triton)])
@pytest.mark.parametrize("seed,head_dim,block_size,dtype,big,keep_prob", COMPACT_CASES)
def test_compaction_moves_kept_slots(seed, head_dim, block_size, dtype, big, keep_prob, impl):
    gen = torch.Generator().manual_seed(seed)
    # Long lists so that some rows need more than one chunk of 32 moves.
    lens = torch.randint(0, 5 * block_size, (3, 3), generator=gen)
    lens[0, 0], lens[0, 1], lens[2, 2] = 0, 1, 4 * block_size + 9
    pool = make_pool(int(((lens + block_size - 1) // block_size).sum()) + 5, block_size, head_dim,
                     dtype, gen, big=big)
    lists = make_lists(pool, lens, gen)
    keep = torch.rand(3, 3, lens.max(), generator=gen) < keep_prob
    src, dst, num_moves, kept_pairs = plan_moves(lists, keep, block_size, used_slots(pool), gen)
    assert int(num_moves.max()) > 32
    before = pool.clone_used()
    compact_slots(pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score, src, dst, num_moves,
                  impl=impl)
    after = pool.clone_used()

    def at(fields, slot):
        page, off = slot // block_size - pool.used.start, slot % block_size
        return fields[0][page, :, off], fields[1][page, off], fields[2][page, off], fields[3][page, off]

    for old, new in kept_pairs:
        for was, now in zip(at(before, old), at(after, new)):
            assert same_bits(was, now)
    destinations = {int(d) for m in range(len(num_moves)) for d in dst[m, : int(num_moves[m])]}
    untouched = torch.ones_like(before[1], dtype=torch.bool)
    for d in destinations:
        untouched[d // block_size - pool.used.start, d % block_size] = False
    for was, now in zip(before, after):
        view = (lambda t: t.transpose(1, 2)) if was.dim() == 4 else (lambda t: t)
        assert same_bits(view(was)[untouched], view(now)[untouched])


@needs_triton
def test_compaction_triton_equals_reference_on_whole_pool():
    gen = torch.Generator().manual_seed(41)
    block_size = 16
    lens = torch.randint(0, 4 * block_size, (2, 4), generator=gen)
    pool = make_pool(int(((lens + block_size - 1) // block_size).sum()) + 3, block_size, 64,
                     torch.float32, gen)
    lists = make_lists(pool, lens, gen)
    keep = torch.rand(2, 4, lens.max(), generator=gen) < 0.5
    src, dst, num_moves, _ = plan_moves(lists, keep, block_size, used_slots(pool), gen)
    results = {}
    start = pool.clone_used()
    for impl in ("torch", "triton"):
        for t, s in zip((pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score), start):
            t.copy_(s)
        compact_slots(pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score, src, dst, num_moves,
                      impl=impl)
        results[impl] = pool.clone_used()
    for a, b in zip(results["torch"], results["triton"]):
        assert same_bits(a, b)
    assert not same_bits(results["torch"][0], start[0])


# --------------------------------------------------------------------------- wrappers


@needs_triton
def test_auto_picks_triton_when_interpreted_or_cuda():
    expected = DEVICE == "cuda" or is_interpreted(_paged_attention_kernel)
    assert use_triton("auto", _paged_attention_kernel, torch.device(DEVICE)) == expected
    assert use_triton("torch", _paged_attention_kernel, torch.device(DEVICE)) is False


def test_bad_arguments_raise_value_errors_naming_them():
    pool, (key, value, slots, positions, flags) = write_setup(51, 64, 16, torch.float32, False)
    pool_args = (pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score)
    with pytest.raises(ValueError, match="positions has last-dim stride 2"):
        write_kv(key, value, slots, positions.repeat_interleave(2)[::2], flags, *pool_args)
    with pytest.raises(ValueError, match="slot_mapping.*int32"):
        write_kv(key, value, slots.int(), positions, flags, *pool_args)
    with pytest.raises(ValueError, match="impl='cuda'"):
        write_kv(key, value, slots, positions, flags, *pool_args, impl="cuda")
    pool, lists, queries = attention_setup(52, 64, 16, 2, torch.float32, 1)
    att = (queries.token_req, queries.q_pos, lists.page_table, lists.head_lens, pool.kv_pages, pool.slot_pos)
    with pytest.raises(ValueError, match="q has last-dim stride 2"):
        paged_attention(queries.q.repeat_interleave(2, dim=-1)[..., ::2], *att, 0.1)
    small_pages = torch.zeros(4, 2, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="block_size=8"):
        paged_attention(queries.q, *att[:4], small_pages, torch.zeros(4, 8, dtype=torch.int32, device=DEVICE), 0.1)
    with pytest.raises(ValueError, match="q has 3 query heads"):
        paged_attention(queries.q[:, :3], *att, 0.1)
    with pytest.raises(ValueError, match="out has shape"):
        paged_attention(queries.q, *att, 0.1, out=queries.q[:1].clone())
    with pytest.raises(ValueError, match="out has 1 slots"):
        window_attention_colsum(queries.q, *att, 0.1, out=torch.zeros(3, 2, 1, device=DEVICE))
    moves = torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="num_moves has dtype torch.int64"):
        compact_slots(pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score, moves, moves,
                      torch.zeros(2, dtype=torch.int64, device=DEVICE))


def test_package_imports_and_runs_references_without_triton():
    """With triton unimportable the wrappers fall back to torch and 'triton' is refused."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import vllm_adaptive_kv.triton_kernels as k
        assert not k.HAS_TRITON
        pages = torch.randn(4, 2, 16, 64)
        pos = torch.arange(64, dtype=torch.int32).view(4, 16)
        table = torch.tensor([[[2, 0]]], dtype=torch.int32)
        lens = torch.tensor([[20]], dtype=torch.int32)
        q = torch.randn(1, 2, 64)
        req, qpos = torch.zeros(1, dtype=torch.int32), torch.tensor([40], dtype=torch.int32)
        out = k.paged_attention(q, req, qpos, table, lens, pages, pos, 0.125)
        assert torch.isfinite(out).all()
        try:
            k.paged_attention(q, req, qpos, table, lens, pages, pos, 0.125, impl="triton")
        except ValueError as e:
            assert "triton is not importable" in str(e)
        else:
            raise AssertionError("impl='triton' ran without triton")
        print("ok")
    """)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


COMPILE_SCRIPT = """
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_kernel(module, kernel, pointers, consts, num_warps=4):
    fn = getattr(importlib.import_module("vllm_adaptive_kv.triton_kernels." + module), kernel)
    signature = {
        name: "constexpr" if name in consts else "*" + pointers[name] if name in pointers
        else "fp32" if name == "qk_scale" else "i32"
        for name in fn.arg_names
    }
    constexprs = {(fn.arg_names.index(name),): value for name, value in consts.items()}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

from vllm_adaptive_kv.triton_kernels.paged_attention import REDUCE_ROWS, tile_warps

attention_ptrs = dict(q_ptr="bf16", token_req_ptr="i32", q_pos_ptr="i32", table_ptr="i32",
                      head_lens_ptr="i32", kv_ptr="bf16", pos_ptr="i32")
attention_consts = dict(GROUP=3, BLOCK_SIZE=32, BLOCK_D=128, DOT_MODE="tf32")
schedule_ptrs = dict(score_ptr="fp32", weight_ptr="fp32", mask_ptr="u8", tiles_ptr="i32", part_ptr="fp32")
# Every variant the wrapper launches: one split (tiles of 16 tokens, or one token a program,
# scoring fully masked and weighted or not at all), split-K (partials, reduce, score pass).
for tiled, split, score in ((True, False, True), (False, False, True), (False, False, False),
                            (True, True, False), (False, True, True)):
    tile = dict(ROWS=64, BLOCK_M=16) if tiled else dict(ROWS=16, BLOCK_M=1)
    consts = dict(attention_consts, **tile, TILED=tiled, WEIGHTED=score, SCORE_MASK=score)
    warps = tile_warps(tile["ROWS"])
    compile_kernel("paged_attention", "_paged_attention_kernel",
                   dict(attention_ptrs, out_ptr="bf16", **schedule_ptrs),
                   dict(consts, ACCUMULATE_SCORE=score, SPLIT=split), warps)
    if split:
        reduce_consts = {k: v for k, v in consts.items() if k not in ("DOT_MODE", "WEIGHTED", "SCORE_MASK")}
        reduce_consts["ROWS"] = REDUCE_ROWS
        compile_kernel("paged_attention", "_paged_attention_reduce_kernel",
                       dict(token_req_ptr="i32", head_lens_ptr="i32", tiles_ptr="i32", part_ptr="fp32",
                            stats_ptr="fp32", out_ptr="bf16"), dict(reduce_consts, KEEP_STATS=score))
    if split and score:
        score_ptrs = {k: v for k, v in schedule_ptrs.items() if k != "part_ptr"}
        compile_kernel("paged_attention", "_paged_score_kernel", dict(attention_ptrs, stats_ptr="fp32", **score_ptrs),
                       consts, warps)
compile_kernel("window_stats", "_window_colsum_kernel", dict(attention_ptrs, out_ptr="fp32"),
               dict(attention_consts, GROUP_PAD=16))
compile_kernel("write_kv", "_write_kv_kernel",
               dict(key_ptr="fp16", value_ptr="fp16", slot_mapping_ptr="i64", positions_ptr="i32",
                    flags_ptr="u8", kv_ptr="fp16", pos_ptr="i32", slot_flags_ptr="u8", score_ptr="fp32"),
               dict(BLOCK_SIZE=16, BLOCK_D=64))
compile_kernel("compaction", "_compact_slots_kernel",
               dict(kv_ptr="fp32", pos_ptr="i32", flags_ptr="u8", score_ptr="fp32", src_ptr="i64",
                    dst_ptr="i64", num_moves_ptr="i32"),
               dict(BLOCK_SIZE=16, BLOCK_D=64, BLOCK_MOVES=32))
print("ok")
"""


@pytest.mark.slow
@needs_triton
def test_kernels_compile_for_sm90(tmp_path):
    """Compiled mode (not the interpreter) type-checks differently: compile each kernel for
    an H100 (sm_90, through ptxas) without needing a GPU. Skipped if the backend is absent."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton's NVIDIA compiler backend is not importable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, do not reuse a cache
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


WEIGHT_CASES = [ATTENTION_PARAMS[1], ATTENTION_PARAMS[2], ATTENTION_PARAMS[-1]]


def _weighted_call(case, impl, weights):
    pool, lists, queries = case.setup()
    used = pool.used
    before = pool.slot_score[used].clone()
    paged_attention(queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
                    pool.kv_pages, pool.slot_pos, case.head_dim**-0.5,
                    slot_score=pool.slot_score, score_weight=weights(queries.q.shape[0]), impl=impl)
    return (pool.slot_score[used] - before).double()


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_score_weight_scales_each_tokens_contribution(case: AttentionCase):
    """Weighted accumulation = sum over tokens of weight x that token's own (unweighted) delta."""
    pool, lists, queries = case.setup()
    num_tokens = queries.q.shape[0]
    gen = torch.Generator().manual_seed(case.seed)
    weight = torch.rand(num_tokens, generator=gen)
    weight[::2] = 0.0  # rows outside an observation window
    got = _weighted_call(case, "torch", lambda n: weight.to(DEVICE))
    want = torch.zeros_like(got)
    for t in range(num_tokens):
        one_hot = torch.zeros(num_tokens)
        one_hot[t] = 1.0
        want += weight[t].double() * _weighted_call(case, "torch", lambda n, w=one_hot: w.to(DEVICE))
    tol = SCORE_TOL[case.dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert got.abs().sum() > 0


@needs_triton
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_score_weight_triton_matches_reference(case: AttentionCase):
    gen = torch.Generator().manual_seed(7)
    weights = lambda n: (torch.rand(n, generator=gen) * (torch.arange(n) % 3 != 0)).to(DEVICE)  # noqa: E731
    got = _weighted_call(case, "triton", weights)
    gen.manual_seed(7)
    want = _weighted_call(case, "torch", weights)
    tol = SCORE_TOL[case.dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_score_weight_needs_slot_score():
    case = ATTENTION_CASES[0]
    pool, lists, queries = case.setup()
    with pytest.raises(ValueError, match="score_weight"):
        paged_attention(queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
                        pool.kv_pages, pool.slot_pos, 0.125,
                        score_weight=torch.ones(queries.q.shape[0], device=DEVICE))


# --------------------------------------------------------------------------- schedules
#
# paged_attention's per-list score mask (score_lists), split-K (num_splits: partials,
# reduce, score pass) and query tiles (query_tiles / tile_tokens): the same results as
# the reference, which honours the mask and ignores the schedule.


def grouped_queries(queries: Queries, num_reqs: int, gen) -> tuple[Queries, list[int]]:
    """The runtime's token order: tokens grouped by request (requests in a random order),
    a random 1..all of each request's tokens kept. -> (queries, tokens per request)."""
    req = queries.token_req.cpu()
    order, counts = [], []
    for r in torch.randperm(num_reqs, generator=gen).tolist():
        idx = (req == r).nonzero().flatten().tolist()
        n = int(torch.randint(1, len(idx) + 1, (1,), generator=gen))
        order += idx[:n]
        counts.append(n)
    order = torch.tensor(order, device=DEVICE)
    return Queries(queries.q[order].contiguous(), queries.token_req[order].contiguous(),
                   queries.q_pos[order].contiguous()), counts


def random_score_lists(num_reqs: int, num_heads: int, gen, as_uint8: bool = False) -> torch.Tensor:
    """[R, H] mask holding both values, a strided layer view of [R, L, H] like the runtime's."""
    full = torch.rand(num_reqs, 2, num_heads, generator=gen) < 0.5
    full[0, 1, 0], full[-1, 1, -1] = True, False
    return full.to(torch.uint8 if as_uint8 else torch.bool).to(DEVICE)[:, 1]


def random_weights(num_tokens: int, gen) -> torch.Tensor:
    weight = torch.rand(num_tokens, generator=gen) + 0.25
    weight[1::3] = 0.0  # rows outside an observation window
    return weight.to(DEVICE)


def list_slots(lists: HeadLists, block_size: int, score_lists: torch.Tensor, listed: bool) -> list[int]:
    num_reqs, num_heads = lists.head_lens.shape
    return [s for r in range(num_reqs) for h in range(num_heads) if bool(score_lists[r, h]) == listed
            for s in lists.slots(r, h, block_size)]


class ScheduleCase(NamedTuple):
    case: AttentionCase
    tile_tokens: int | None  # None: one token a program
    num_splits: int
    score: bool = True  # scores with a mask (uint8 when the seed is odd) and weights
    uint8_mask: bool = False

    @property
    def name(self):
        tiles = f"tiles{self.tile_tokens}" if self.tile_tokens else "per-token"
        return (f"{self.case.name}-{tiles}-splits{self.num_splits}"
                + ("-masked" + ("-u8" if self.uint8_mask else "") if self.score else "-noscore"))


def random_schedule_cases(count: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for case in random_attention_cases(count, seed):
        tile = rng.choice([None, 1, 2, 3]) if case.tokens_per_req > 1 else rng.choice([None, 1])
        splits = rng.choice([1, 2, 3, 4]) if tile else rng.choice([2, 3, 4])
        cases.append(ScheduleCase(case, tile, splits, uint8_mask=rng.random() < 0.5))
    return cases


SCHEDULE_CASES = [
    ScheduleCase(AttentionCase(61, 64, 16, 8, torch.bfloat16, 1), None, 4),  # decode, split-K
    ScheduleCase(AttentionCase(62, 128, 32, 3, torch.float32, 4, heads=3), 3, 1),  # tiles only
    ScheduleCase(AttentionCase(63, 64, 16, 3, torch.float16, 3, big=True), 2, 3, uint8_mask=True),
    ScheduleCase(AttentionCase(64, 64, 32, 1, torch.float32, 4), 4, 2, score=False),
    ScheduleCase(AttentionCase(65, 64, 32, 8, torch.bfloat16, 3), 3, 3),  # 24 rows: 2 reduce blocks
    *random_schedule_cases(6, seed=300),
]
SCHEDULE_PARAMS = [pytest.param(case, id=case.name) for case in SCHEDULE_CASES]


@needs_triton
@pytest.mark.parametrize("sched", SCHEDULE_PARAMS)
def test_paged_attention_schedules_match_reference(sched: ScheduleCase):
    """Split-K, query tiles and the score mask: outputs and scores equal the reference's;
    the slots of masked-off lists keep their scores bit for bit (both impls)."""
    case = sched.case
    pool, lists, queries = case.setup()
    gen = torch.Generator().manual_seed(case.seed + 1000)
    num_reqs, num_heads = lists.head_lens.shape
    queries, counts = grouped_queries(queries, num_reqs, gen)
    score_lists = random_score_lists(num_reqs, num_heads, gen, sched.uint8_mask) if sched.score else None
    weight = random_weights(queries.q.shape[0], gen) if sched.score else None
    tiles = make_query_tiles(counts, sched.tile_tokens, device=DEVICE) if sched.tile_tokens else None
    used, block_size = pool.used, case.block_size
    start = pool.slot_score[used].clone()
    results = {}
    for impl in ("torch", "triton"):
        pool.slot_score[used] = start
        out = torch.full_like(queries.q, float("nan"))  # poison: every element must be written
        schedule = dict(query_tiles=tiles, tile_tokens=sched.tile_tokens, num_splits=sched.num_splits)
        paged_attention(queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
                        pool.kv_pages, pool.slot_pos, case.head_dim**-0.5, out=out,
                        slot_score=pool.slot_score if sched.score else None, score_weight=weight,
                        score_lists=score_lists, impl=impl, **(schedule if impl == "triton" else {}))
        results[impl] = out, pool.slot_score[used].clone()
    assert not results["triton"][0].isnan().any()
    tol = OUT_TOL[case.dtype]
    torch.testing.assert_close(results["triton"][0].float(), results["torch"][0].float(), atol=tol, rtol=tol)
    tol = SCORE_TOL[case.dtype]
    torch.testing.assert_close(results["triton"][1], results["torch"][1], atol=tol, rtol=tol)
    if not sched.score:
        assert same_bits(results["triton"][1], start)
        return
    slots = torch.tensor(list_slots(lists, block_size, score_lists, listed=False), dtype=torch.int64)
    page, off = slots // block_size - used.start, slots % block_size
    for impl, (_, score) in results.items():
        assert same_bits(score.cpu()[page, off], start.cpu()[page, off]), impl
    # Listed lists got the reference's scores (above); both added some or neither did.
    assert same_bits(results["triton"][1], start) == same_bits(results["torch"][1], start)


SCORE_MASK_CASES = [pytest.param(c, id=c.name) for c in (ATTENTION_CASES[1], ATTENTION_CASES[3],
                                                         ATTENTION_CASES[4])]


@pytest.mark.parametrize("case", SCORE_MASK_CASES)
def test_score_lists_reference_matches_float64(case: AttentionCase):
    pool, lists, queries = case.setup()
    gen = torch.Generator().manual_seed(case.seed + 2000)
    score_lists = random_score_lists(*lists.head_lens.shape, gen)
    weight = random_weights(queries.q.shape[0], gen)
    before = pool.slot_score[pool.used].clone()
    scale = case.head_dim**-0.5
    paged_attention_reference(queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens,
                              pool.kv_pages, pool.slot_pos, scale, slot_score=pool.slot_score,
                              score_weight=weight, score_lists=score_lists)
    _, delta, _, _ = dense_attention(pool, lists, queries, scale, score_lists.cpu(), weight.cpu())
    want = apply_score_delta(before, delta, pool.used, case.block_size)
    tol = SCORE_TOL[case.dtype]
    torch.testing.assert_close(pool.slot_score[pool.used].cpu().double(), want, atol=tol, rtol=tol)


def test_make_query_tiles_cuts_each_request_into_runs():
    assert make_query_tiles([5, 1, 0, 3], 2).tolist() == [[0, 2], [2, 2], [4, 1], [5, 1], [6, 2], [8, 1]]
    assert make_query_tiles([2, 1], 4, starts=[3, 0]).tolist() == [[3, 2], [0, 1]]
    tiles = make_query_tiles([], 4)
    assert tiles.shape == (0, 2) and tiles.dtype == torch.int32
    with pytest.raises(ValueError, match="tile_tokens=0"):
        make_query_tiles([3], 0)
    with pytest.raises(ValueError, match="starts has 1 entries"):
        make_query_tiles([3, 2], 2, starts=[0])


def test_split_count_follows_host_bounds():
    """Splits come from the table width and the grid (never list lengths): long tables are
    split into <= SPLIT_MAX_PAGES-page runs, small grids for occupancy, both capped."""
    cpu = torch.device("cpu")  # one "SM": occupancy wants 4 programs
    assert split_count(1, 15, 4, 128, cpu) == 1  # too short to split
    assert split_count(2, 63, 4, 128, cpu) == 1  # splits of < SPLIT_MIN_PAGES pages cost more than they win
    assert split_count(1, 640, 4, 128, cpu) == 10  # a 10k-slot list: 10 runs of 64 pages
    assert split_count(512, 640, 4, 128, cpu) == 10  # by length even when the grid is full
    assert split_count(1, 6250, 4, 128, cpu) == MAX_SPLITS  # a 100k-slot list: capped
    assert split_count(4096, 6250, 4, 128, cpu) == 15  # 15 x 8.5 MB of partials fit the 128 MiB cap
    assert split_count(1, 1 << 20, 4, 128, cpu) == MAX_SPLITS
    assert split_count(2, 64, 4, 128, cpu) == 2  # occupancy: 2 programs -> 2 splits each
    assert split_count(1 << 20, 6250, 128, 128, cpu) == 1  # partials would exceed the workspace cap


def test_schedule_arguments_raise_value_errors_naming_them():
    pool, lists, queries = attention_setup(52, 64, 16, 2, torch.float32, 2)
    att = (queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens, pool.kv_pages,
           pool.slot_pos, 0.1)
    num_reqs, num_heads = lists.head_lens.shape
    mask = torch.ones(num_reqs, num_heads, dtype=torch.bool, device=DEVICE)
    tiles = make_query_tiles([2] * num_reqs, 2, device=DEVICE)
    score = dict(slot_score=pool.slot_score)
    with pytest.raises(ValueError, match="score_lists was given without slot_score"):
        paged_attention(*att, score_lists=mask)
    with pytest.raises(ValueError, match=r"score_lists has shape \(3, 3\); expected \(3, 2\)"):
        paged_attention(*att, **score, score_lists=torch.ones(num_reqs, num_heads + 1, dtype=torch.bool,
                                                              device=DEVICE))
    with pytest.raises(ValueError, match="score_lists has dtype torch.int32"):
        paged_attention(*att, **score, score_lists=mask.int())
    with pytest.raises(ValueError, match="query_tiles has dtype torch.int64"):
        paged_attention(*att, query_tiles=tiles.long(), tile_tokens=2)
    with pytest.raises(ValueError, match=r"query_tiles has shape \(3, 3\)"):
        paged_attention(*att, query_tiles=torch.zeros(3, 3, dtype=torch.int32, device=DEVICE), tile_tokens=2)
    with pytest.raises(ValueError, match="tile_tokens=None is not supported with query_tiles"):
        paged_attention(*att, query_tiles=tiles)
    with pytest.raises(ValueError, match="tile_tokens was given without query_tiles"):
        paged_attention(*att, tile_tokens=2)
    with pytest.raises(ValueError, match="tile_tokens=200 gives 400 query rows"):
        paged_attention(*att, query_tiles=tiles, tile_tokens=200)
    with pytest.raises(ValueError, match="num_splits=0"):
        paged_attention(*att, num_splits=0)


# --------------------------------------------------------------------------- no host reads

# Tensor methods that read device values on the host (on CUDA: a synchronisation).
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
              "__array__", "unique", "unique_consecutive", "masked_select")


@contextlib.contextmanager
def forbid_host_reads():
    """Make every host read of a tensor value (and boolean indexing) raise AssertionError.

    On CUDA, torch's sync debug mode also turns any real synchronisation into an error."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    saved_fns = {name: getattr(torch, name) for name in ("nonzero", "unique", "unique_consecutive",
                                                         "masked_select")}
    getitem = torch.Tensor.__getitem__

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host read of a tensor value: {name}")
        return method

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("host read of a tensor value: boolean indexing")
        return getitem(self, index)

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        for name in saved_fns:
            setattr(torch, name, refuse(name))
        torch.Tensor.__getitem__ = checked_getitem
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        for name, fn in saved_fns.items():
            setattr(torch, name, fn)
        torch.Tensor.__getitem__ = getitem


class FakeLaunches:
    """Stands in for kernels: records (kernel, grid, constexprs) instead of launching, so the
    wrappers' host code runs alone."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch, module, *kernels):
        monkeypatch.setattr(module, "use_triton", lambda *args, **kwargs: True)
        for name in kernels:
            monkeypatch.setattr(module, name, self._kernel(name))

    def _kernel(self, name):
        calls = self.calls

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **consts: calls.append((name, grid, consts))

        return Kernel()


ATTENTION_KERNELS = ("_paged_attention_kernel", "_paged_attention_reduce_kernel", "_paged_score_kernel")


def test_forbid_host_reads_catches_reads():
    t = torch.ones(3)
    for read in (lambda: t.item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: int(t[0]),
                 lambda: t[t > 0], lambda: t.nonzero(), lambda: torch.unique(t), lambda: range(t[0].long())):
        with pytest.raises(AssertionError, match="host read"):
            with forbid_host_reads():
                read()
    assert t.tolist() == [1.0, 1.0, 1.0]  # restored


def test_paged_attention_wrapper_reads_no_device_values(monkeypatch):
    """The Triton path's host code (checks, split choice, workspace, launches) reads no
    tensor value: every grid and bound comes from shapes and host arguments."""
    pa = importlib.import_module("vllm_adaptive_kv.triton_kernels.paged_attention")
    launches = FakeLaunches()
    launches.install(monkeypatch, pa, *ATTENTION_KERNELS)
    pool, lists, queries = AttentionCase(71, 64, 16, 3, torch.float16, 3).setup()
    gen = torch.Generator().manual_seed(71)
    num_reqs, num_heads = lists.head_lens.shape
    queries, counts = grouped_queries(queries, num_reqs, gen)
    mask = random_score_lists(num_reqs, num_heads, gen)
    weight = random_weights(queries.q.shape[0], gen)
    tiles = make_query_tiles(counts, 2, device=DEVICE)
    args = (queries.q, queries.token_req, queries.q_pos, lists.page_table, lists.head_lens, pool.kv_pages,
            pool.slot_pos, 0.125)
    with forbid_host_reads():
        paged_attention(*args, slot_score=pool.slot_score, score_weight=weight, score_lists=mask,
                        query_tiles=tiles, tile_tokens=2, num_splits=3, impl="triton")
        paged_attention(*args, slot_score=pool.slot_score, score_lists=mask, impl="triton")
        paged_attention(*args, impl="triton", num_splits=2)
    assert [name for name, _, _ in launches.calls] == [
        *ATTENTION_KERNELS, "_paged_attention_kernel", "_paged_attention_kernel", "_paged_attention_reduce_kernel"]
    for _, grid, _ in launches.calls:
        assert all(type(n) is int for n in grid)
    width = lists.page_table.shape[2]
    per_split = -(-width // 3)  # three splits asked: runs of ceil(width / 3) pages
    assert launches.calls[0][1] == (len(tiles), num_heads, -(-width // per_split)) and per_split < width
    assert launches.calls[0][2]["TILED"] and launches.calls[0][2]["SPLIT"]
    assert launches.calls[3][1] == (queries.q.shape[0], num_heads, 1)
    assert launches.calls[3][2]["SCORE_MASK"] and not launches.calls[3][2]["SPLIT"]
