"""The C++ CPU kernels (csrc/cpu/) against their torch references (vllm_adaptive_kv/cpu_kernels.py).

Random shapes: ragged per-head list lengths (empty, partial last pages, full pages),
GQA ratios 1-8, lists scattered over a large pool with page ids near its end, both
visibility rules (list length, slot position), float32 / bfloat16 / float16.
"""

import math

import pytest
import torch

from vllm_adaptive_kv import cpu_kernels
from vllm_adaptive_kv.cpu_kernels import scored_decode_attention, scored_decode_attention_reference

needs_kernels = pytest.mark.skipif(not cpu_kernels.HAS_CPU_KERNELS, reason="vllm_adaptive_kv._C is not built")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
ISAS = ["avx512", "avx2", "generic"]  # every build of the list kernels (csrc/cpu/list_kernels.h)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with this ISA's list kernels (skipped where the CPU or build has none)."""
    if not cpu_kernels.HAS_CPU_KERNELS:
        pytest.skip("vllm_adaptive_kv._C is not built")
    if request.param not in cpu_kernels.cpu_isas():
        pytest.skip(f"this CPU and build cannot run {request.param} (runs {cpu_kernels.cpu_isas()})")
    before = cpu_kernels.cpu_isa()
    cpu_kernels.cpu_isa(request.param)
    yield request.param
    cpu_kernels.cpu_isa(before)


def random_case(seed: int, dtype, group: int, block_size: int = 32, head_dim: int = 64, num_pages: int = 3000):
    """A step's decode lists over a pool whose pages are drawn from its last 1000 (large ids
    when the pool is large). Only those pages are written: the rest of a large pool stays
    untouched virtual memory."""
    gen = torch.Generator().manual_seed(seed)
    rows, heads, width = 5, 3, 6
    tokens = rows  # one decode token per request row
    lens = torch.randint(0, width * block_size + 1, (rows, heads), generator=gen, dtype=torch.int32)
    lens[0, 0], lens[1, 1], lens[2, 2] = 0, block_size, 1  # empty, one full page, one slot
    pages = torch.randperm(1000, generator=gen)[: rows * heads * width].to(torch.int32) + (num_pages - 1000)
    kv = torch.empty(num_pages, 2, block_size, head_dim, dtype=dtype)
    kv[pages.long()] = torch.randn(pages.numel(), 2, block_size, head_dim, generator=gen).to(dtype)
    slot_pos = torch.randint(0, 400, (num_pages, block_size), generator=gen, dtype=torch.int32)
    slot_score = torch.rand(num_pages, block_size, generator=gen)
    table = pages.view(rows, heads, width).clone()
    table[lens[..., None] <= torch.arange(width) * block_size] = -1  # unused columns hold no page
    q = torch.randn(tokens, heads * group, head_dim, generator=gen).to(dtype)
    q_pos = torch.randint(200, 420, (tokens,), generator=gen, dtype=torch.int32)  # some slots lie in the future
    # every list of some rows, one head of others (a per-list score mask), shuffled
    token_row = torch.randperm(rows, generator=gen)
    token, row, head = [], [], []
    for t in range(tokens):
        for h in range(heads):
            if t % 2 == 0 or h == t % heads:
                token.append(t), row.append(int(token_row[t])), head.append(h)
    order = torch.randperm(len(token), generator=gen)
    index = [torch.tensor(x, dtype=torch.int64)[order] for x in (token, row, head)]
    return dict(q=q, token=index[0], row=index[1], head=index[2], table=table, lens=lens, q_pos=q_pos,
                kv_pages=kv, slot_pos=slot_pos, slot_score=slot_score, scale=1 / math.sqrt(head_dim))


def assert_scores_close(got, want, dtype):
    """Scores within 1e-5, except where a logit rounded to a 16-bit pool dtype fell on the other
    side of a rounding boundary (the kernel's float32 dot and torch's add in different orders):
    a step of one pool ulp in that logit: a few of the case's scored slots, each within 1e-3."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    off = ~torch.isclose(got, want, atol=1e-5, rtol=1e-5)
    assert int(off.sum()) <= 8, f"{int(off.sum())} slots differ"
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def run(fn, case):
    case = dict(case, slot_score=case["slot_score"].clone())  # the one input the kernels write
    out = torch.full_like(case["q"], float("nan"))
    fn(case["q"], case["token"], case["row"], case["head"], case["table"], case["lens"], case["q_pos"],
       case["kv_pages"], case["slot_pos"], out, case["slot_score"], case["scale"])
    return out, case["slot_score"]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_scored_decode_attention_matches_reference(dtype, group, seed, isa):
    case = random_case(seed, dtype, group)
    want_out, want_score = run(scored_decode_attention_reference, case)
    got_out, got_score = run(scored_decode_attention, case)
    listed = torch.zeros(case["q"].shape[:2], dtype=torch.bool)
    listed.view(case["q"].shape[0], -1, group)[case["token"], case["head"]] = True
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_out[listed].float(), want_out[listed].float(), atol=tol, rtol=tol)
    assert torch.isnan(got_out[~listed].float()).all()  # rows of other lists are not touched
    assert_scores_close(got_score, want_score, dtype)


@needs_kernels
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (32, 128), (64, 32), (48, 80)])
def test_other_block_sizes_and_head_dims(block_size, head_dim, isa):
    case = random_case(7, torch.float32, 2, block_size=block_size, head_dim=head_dim)
    want_out, want_score = run(scored_decode_attention_reference, case)
    got_out, got_score = run(scored_decode_attention, case)
    listed = ~torch.isnan(want_out)
    torch.testing.assert_close(got_out[listed], want_out[listed], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_score, want_score, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_page_offsets_past_int32():
    # 600k pages of 2 x 32 x 64 bf16: element offsets of the last pages exceed 2**31
    case = random_case(5, torch.bfloat16, 3, num_pages=600_000)
    assert int(case["table"].max()) * 2 * 32 * 64 > 2 ** 31
    want_out, want_score = run(scored_decode_attention_reference, case)
    got_out, got_score = run(scored_decode_attention, case)
    listed = ~torch.isnan(want_out.float())
    torch.testing.assert_close(got_out[listed].float(), want_out[listed].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_score, want_score, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_scores_sum_to_the_group_size_per_list():
    case = random_case(3, torch.float32, 4)
    before = case["slot_score"].clone()
    _, after = run(scored_decode_attention, case)
    added = (after - before).sum()
    seeing = case["lens"][case["row"], case["head"]] > 0  # may still see nothing (positions); bound only
    assert added <= 4 * int(seeing.sum()) + 1e-3


@needs_kernels
def test_bad_arguments_name_what_is_wrong():
    case = random_case(0, torch.float32, 2)
    bad_head = dict(case, head=case["head"].clone())
    bad_head["head"][0] = 3
    with pytest.raises(RuntimeError, match="out of range"):
        run(scored_decode_attention, bad_head)
    with pytest.raises(RuntimeError, match="q must be"):
        run(scored_decode_attention, dict(case, q=case["q"].to(torch.bfloat16)))
    bad_table = dict(case, table=case["table"].clone())
    bad_table["table"][case["row"][0], case["head"][0], 0] = 10 ** 6
    case_len = int(case["lens"][case["row"][0], case["head"][0]])
    if case_len:
        score, out = bad_table["slot_score"].clone(), torch.zeros_like(case["q"])
        with pytest.raises(RuntimeError, match="page 0 is 1000000"):
            scored_decode_attention(*(bad_table[k] for k in ("q", "token", "row", "head", "table", "lens", "q_pos",
                                                             "kv_pages", "slot_pos")), out, score, case["scale"])
        # every page is checked before any list is attended: nothing was written
        assert torch.equal(score, bad_table["slot_score"]) and not out.any()
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16, got Double"):
        run(scored_decode_attention, dict(case, q=case["q"].double(), kv_pages=case["kv_pages"].double()))


@needs_kernels
def test_cpu_isa_refuses_a_name_it_cannot_run():
    allowed = cpu_kernels.cpu_isas()
    assert allowed[-1] == "generic" and cpu_kernels.cpu_isa() == allowed[0]  # the best, unless told otherwise
    with pytest.raises(ValueError, match=r"'avx9'.*allowed: \['"):
        cpu_kernels.cpu_isa("avx9")
    with pytest.raises(RuntimeError, match="cpu_isa is 'avx9'.*allowed: " + allowed[0]):
        torch.ops.adaptive_kv.cpu_isa("avx9")  # the op checks too
    assert cpu_kernels.cpu_isa() == allowed[0]  # unchanged


@needs_kernels
def test_threads_take_lists_without_changing_results():
    """Lists go to threads longest first, as each thread frees: one list's result is the same
    whichever thread computes it, bit for bit, at any thread count."""
    case = random_case(4, torch.bfloat16, 3)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(scored_decode_attention, case))
    finally:
        torch.set_num_threads(threads)
    for out, score in results[1:]:
        assert torch.equal(out.nan_to_num(), results[0][0].nan_to_num()) and torch.equal(score, results[0][1])


def test_wrapper_says_how_to_build_when_missing(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "HAS_CPU_KERNELS", False)
    case = random_case(0, torch.float32, 1)
    with pytest.raises(RuntimeError, match="make setup"):
        run(scored_decode_attention, case)


# --- write_kv ---------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_transposed", [False, True])
def test_write_kv_matches_reference(dtype, k_transposed):
    from vllm_adaptive_kv.cpu_kernels import write_kv
    from vllm_adaptive_kv.triton_kernels.write_kv import write_kv_reference

    gen = torch.Generator().manual_seed(int(k_transposed))
    num_pages, bs, heads, head_dim, tokens = 600_000, 32, 3, 64, 7  # slots past 2**31 / (2 * 64) elements
    qkv = torch.randn(tokens, (3 + 2) * heads, head_dim, generator=gen).to(dtype)  # k / v are strided views
    key, value = qkv[:, 3 * heads:4 * heads], qkv[:, 4 * heads:]
    pages = torch.randperm(2000, generator=gen)[: tokens * heads] + num_pages - 2000
    slot_mapping = (pages * bs + torch.randint(0, bs, (tokens * heads,), generator=gen)).view(tokens, heads)
    slot_mapping[2, 1] = -1  # skipped
    positions = torch.randint(0, 5000, (tokens,), generator=gen, dtype=torch.int32)
    flags = torch.randint(0, 4, (tokens,), generator=gen, dtype=torch.uint8)
    pools = []
    for _ in range(2):
        kv = torch.empty(num_pages, 2, bs, head_dim, dtype=dtype)  # untouched virtual memory
        kv[pages] = 0
        pools.append((kv, torch.zeros(num_pages, bs, dtype=torch.int32), torch.zeros(num_pages, bs, dtype=torch.uint8),
                      torch.ones(num_pages, bs)))
    write_kv(key, value, slot_mapping, positions, flags, *pools[0], k_transposed=k_transposed)
    write_kv_reference(key, value, slot_mapping, positions, flags, *pools[1], k_transposed=k_transposed)
    for got, want in zip(pools[0], pools[1]):
        assert torch.equal(got[pages], want[pages])
    assert pools[0][3][pages].eq(0).sum() == tokens * heads - 1  # the skipped slot kept its score


@needs_kernels
def test_write_kv_refuses_a_slot_past_the_pool():
    from vllm_adaptive_kv.cpu_kernels import write_kv

    kv = torch.zeros(4, 2, 16, 8)
    meta = (torch.zeros(4, 16, dtype=torch.int32), torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 16))
    key = torch.ones(1, 1, 8)
    with pytest.raises(RuntimeError, match="past the pool's 4 pages"):
        write_kv(key, key, torch.tensor([[64]]), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.uint8),
                 kv, *meta)
    with pytest.raises(RuntimeError, match="key must be"):
        write_kv(key.double(), key, torch.tensor([[0]]), torch.zeros(1, dtype=torch.int32),
                 torch.zeros(1, dtype=torch.uint8), kv, *meta)


# --- compact_slots ----------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_transposed", [False, True])
@pytest.mark.parametrize("keep_prob", [0.4, 0.93])  # short runs of moves; long runs overlapping in a page
def test_compact_slots_matches_reference_on_a_real_plan(dtype, k_transposed, keep_prob):
    from vllm_adaptive_kv.core.paging import PagedHeadCache
    from vllm_adaptive_kv.cpu_kernels import compact_slots
    from vllm_adaptive_kv.triton_kernels.compaction import compact_slots_reference

    gen = torch.Generator().manual_seed(int(k_transposed))
    bs, head_dim, rows, layers, heads = 16, 64, 3, 2, 3
    cache = PagedHeadCache(400, bs, layers, heads, 8, rows)
    row_ids = torch.arange(rows)
    cache.allocate(row_ids, torch.tensor([100, 37, 120]), 257)  # ragged: partial last pages
    keep = torch.rand(rows, layers, heads, 120, generator=gen) < keep_prob
    plan = cache.plan_compaction(row_ids, keep)
    pools = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        pools.append((torch.randn(400, 2, bs, head_dim, generator=g).to(dtype),
                      torch.randint(0, 999, (400, bs), generator=g, dtype=torch.int32),
                      torch.randint(0, 4, (400, bs), generator=g, dtype=torch.uint8), torch.rand(400, bs, generator=g)))
    compact_slots(*pools[0], plan.src_slot, plan.dst_slot, plan.num_moves, k_transposed=k_transposed)
    compact_slots_reference(*pools[1], plan.src_slot, plan.dst_slot, plan.num_moves, k_transposed=k_transposed)
    assert int(plan.num_moves.sum()) > 100
    for got, want in zip(pools[0], pools[1]):
        assert torch.equal(got, want)


@needs_kernels
def test_compact_slots_refuses_a_slot_past_the_pool():
    from vllm_adaptive_kv.cpu_kernels import compact_slots

    pool = (torch.zeros(4, 2, 16, 8), torch.zeros(4, 16, dtype=torch.int32), torch.zeros(4, 16, dtype=torch.uint8),
            torch.zeros(4, 16))
    with pytest.raises(RuntimeError, match="outside the pool's 4 pages"):
        compact_slots(*pool, torch.tensor([[70]]), torch.tensor([[0]]), torch.tensor([1], dtype=torch.int32))


# --- score_rows -------------------------------------------------------------------------


def rows_case(seed: int, dtype, group: int, num_pages: int = 3000):
    """Prefill observation rows: each request's last few tokens, all heads of its lists."""
    case = random_case(seed, dtype, group, num_pages=num_pages)
    gen = torch.Generator().manual_seed(seed + 100)
    rows, heads = case["lens"].shape
    tokens = 4 * rows
    case["q"] = torch.randn(tokens, heads * group, case["q"].shape[2], generator=gen).to(dtype)
    case["q_pos"] = torch.randint(150, 420, (tokens,), generator=gen, dtype=torch.int32)
    counts = [0, 1, 3, 4, 2]  # an empty span, a single row, ...
    first = [4 * i for i in range(rows)]
    case.update(first=torch.tensor(first).repeat_interleave(heads), count=torch.tensor(counts).repeat_interleave(heads),
                row=torch.arange(rows).repeat_interleave(heads), head=torch.arange(heads).repeat(rows))
    return case


def run_rows(fn, case):
    score = case["slot_score"].clone()
    fn(case["q"], case["first"], case["count"], case["row"], case["head"], case["table"], case["lens"],
       case["q_pos"], case["kv_pages"], case["slot_pos"], score, case["scale"])
    return score


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 9])
def test_score_rows_matches_reference(dtype, group, isa):
    from vllm_adaptive_kv.cpu_kernels import score_rows, score_rows_reference

    case = rows_case(group, dtype, group)
    want = run_rows(score_rows_reference, case)
    got = run_rows(score_rows, case)
    assert not torch.equal(want, case["slot_score"])  # something was scored
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_score_rows_page_offsets_past_int32():
    from vllm_adaptive_kv.cpu_kernels import score_rows, score_rows_reference

    case = rows_case(5, torch.bfloat16, 3, num_pages=600_000)
    torch.testing.assert_close(run_rows(score_rows, case), run_rows(score_rows_reference, case), atol=1e-5, rtol=1e-5)
