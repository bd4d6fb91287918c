"""Property tests of the per-head page allocator: ownership, leaks, contents, order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_adaptive_kv.core.layout import KVPool
from vllm_adaptive_kv.core.paging import PagedHeadCache, PagePoolShortError
from vllm_adaptive_kv.triton_kernels.compaction import compact_slots_reference
from vllm_adaptive_kv.triton_kernels.write_kv import write_kv_reference

L, H, D = 2, 3, 4
MAX_REQS = 3


class Harness:
    """The cache under test plus a shadow model: the token ids each list holds, in order."""

    def __init__(self, num_pages: int, block_size: int, width: int, k_transposed: bool = False) -> None:
        self.cache = PagedHeadCache(num_pages, block_size, L, H, width, MAX_REQS)
        self.pool = KVPool.allocate(num_pages, block_size, D, torch.float32, k_transposed=k_transposed)
        self.shadow = {(r, l, h): [] for r in range(MAX_REQS) for l in range(L) for h in range(H)}
        self.next_token = 0

    def allocate(self, row: int, n: int) -> bool:
        rows = torch.tensor([row])
        counts = torch.tensor([n])
        try:
            self.cache.check_allocate(rows, counts)
        except RuntimeError:
            return False
        slots = self.cache.allocate(rows, counts, total_tokens=n)
        tokens = torch.arange(self.next_token, self.next_token + n)
        self.next_token += n
        for layer in range(L):
            key = self._content(tokens, layer)
            write_kv_reference(
                key, -key, slots[layer], tokens.to(torch.int32), (tokens % 4).to(torch.uint8),
                self.pool.kv_pages, self.pool.slot_pos, self.pool.slot_flags, self.pool.slot_score,
                self.pool.k_transposed,
            )
            for h in range(H):
                self.shadow[(row, layer, h)].extend(tokens.tolist())
        return True

    @staticmethod
    def _content(tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """K rows encode (token, layer, head) so a misplaced row is detected: [T, H, D]."""
        head = torch.arange(H)[None, :, None]
        lane = torch.arange(D)[None, None, :]
        return (tokens[:, None, None] * 1000 + layer * 100 + head * 10 + lane).to(torch.float32)

    def evict(self, row: int, keep: torch.Tensor) -> None:
        """keep [L, H, N] bool; compacts survivors and frees tail pages."""
        plan = self.cache.plan_compaction(torch.tensor([row]), keep[None])
        compact_slots_reference(
            self.pool.kv_pages, self.pool.slot_pos, self.pool.slot_flags, self.pool.slot_score,
            plan.src_slot, plan.dst_slot, plan.num_moves, self.pool.k_transposed,
        )
        self.cache.commit_compaction(plan)
        for layer in range(L):
            for h in range(H):
                held = self.shadow[(row, layer, h)]
                mask = keep[layer, h, : len(held)].tolist()
                self.shadow[(row, layer, h)] = [t for t, k in zip(held, mask) if k]

    def release(self, row: int) -> None:
        self.cache.release(torch.tensor([row]))
        for key in self.shadow:
            if key[0] == row:
                self.shadow[key] = []

    def check(self) -> None:
        self.cache.audit()
        bs = self.cache.block_size
        for (r, layer, h), tokens in self.shadow.items():
            assert int(self.cache.lens[r, layer, h]) == len(tokens)
            if not tokens:
                continue
            logical = torch.arange(len(tokens))
            pages = self.cache.table[r, layer, h, logical // bs].to(torch.int64)
            offsets = logical % bs
            expected = torch.tensor(tokens)
            assert torch.equal(self.pool.slot_pos[pages, offsets].to(torch.int64), expected)
            k_rows = self.pool.k_pages[pages, offsets]
            v_rows = self.pool.v_pages[pages, offsets]
            want = self._content(expected, layer)[:, h]
            assert torch.equal(k_rows, want), f"K rows of list {(r, layer, h)} lost content or order"
            assert torch.equal(v_rows, -want)


op = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, MAX_REQS - 1), st.integers(1, 40)),
    st.tuples(st.just("evict"), st.integers(0, MAX_REQS - 1), st.integers(0, 2**31 - 1)),
    st.tuples(st.just("release"), st.integers(0, MAX_REQS - 1), st.just(0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, min_size=1, max_size=25),
    block_size=st.sampled_from([1, 2, 4, 16]),
    num_pages=st.integers(8, 120),
    keep_prob=st.floats(0.0, 1.0),
    k_transposed=st.booleans(),
)
def test_random_sequences_keep_ownership_and_contents(ops, block_size, num_pages, keep_prob, k_transposed):
    harness = Harness(num_pages, block_size, width=64, k_transposed=k_transposed)
    for kind, row, arg in ops:
        if kind == "alloc":
            harness.allocate(row, arg)
        elif kind == "evict":
            gen = torch.Generator().manual_seed(arg)
            keep = torch.rand(L, H, 64 * block_size, generator=gen) < keep_prob
            harness.evict(row, keep)
        else:
            harness.release(row)
        harness.check()
    for row in range(MAX_REQS):
        harness.release(row)
    harness.check()
    assert int(harness.cache.num_free) == num_pages, "pages leaked after releasing every request"


def test_allocate_is_refused_when_pool_is_exhausted():
    harness = Harness(num_pages=4, block_size=4, width=8)
    # 2 layers x 3 heads = 6 lists need 6 pages for one token: more than 4.
    assert not harness.allocate(0, 1)
    assert int(harness.cache.num_free) == 4
    harness.check()


def test_compaction_frees_whole_pages_and_keeps_order():
    harness = Harness(num_pages=64, block_size=4, width=8)
    assert harness.allocate(0, 10)  # 3 pages per list, 18 in all
    assert int(harness.cache.num_free) == 64 - 18
    keep = torch.zeros(L, H, 16, dtype=torch.bool)
    keep[..., [0, 3, 9]] = True  # 3 survivors -> 1 page per list
    harness.evict(0, keep)
    harness.check()
    assert int(harness.cache.num_free) == 64 - 6
    assert harness.shadow[(0, 1, 2)] == [0, 3, 9]


def test_allocation_spans_existing_partial_page_and_new_pages():
    harness = Harness(num_pages=64, block_size=4, width=8)
    assert harness.allocate(1, 3)
    assert harness.allocate(1, 6)  # fills the partial page, then needs 2 more
    harness.check()
    assert torch.equal(harness.cache.pages_held(torch.tensor([1])), torch.tensor([L * H * 3]))


def test_batched_allocate_over_several_requests_matches_one_by_one():
    """One call for several rows assigns slots in request order, each list growing separately."""
    harness = Harness(num_pages=100, block_size=4, width=8)
    assert harness.allocate(0, 5)
    rows = torch.tensor([2, 0])
    counts = torch.tensor([3, 4])
    slots = harness.cache.allocate(rows, counts, total_tokens=7, max_tokens_per_request=4)
    assert slots.shape == (L, 7, H)
    harness.cache.audit()
    assert harness.cache.lens[0].eq(9).all() and harness.cache.lens[2].eq(3).all()
    flat = slots.reshape(-1)
    assert flat.unique().numel() == flat.numel(), "two tokens were given the same slot"


def test_bad_construction_names_the_value():
    with pytest.raises(ValueError, match="block_size=0"):
        PagedHeadCache(8, 0, 1, 1, 4, 1)


def test_transposed_key_pages_store_each_block_d_major():
    """k_transposed: the K block of a page is [D, bs] in memory (vLLM's CPU kernel layout)."""
    pool = KVPool.allocate(3, 4, D, torch.float32, k_transposed=True)
    key = torch.arange(4 * D, dtype=torch.float32).view(4, 1, D)
    slots = torch.tensor([[4], [5], [6], [7]])  # page 1, offsets 0..3
    write_kv_reference(key, -key, slots, torch.arange(4, dtype=torch.int32), torch.zeros(4, dtype=torch.uint8),
                       pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score, True)
    assert torch.equal(pool.kv_pages[1, 0].reshape(D, 4), key[:, 0].t())  # raw storage: transposed
    assert torch.equal(pool.kv_pages[1, 1], -key[:, 0])  # V rows stay row-major
    assert torch.equal(pool.k_pages[1], key[:, 0])  # the view hides the difference


def test_check_allocate_names_the_request_that_does_not_fit_and_moves_nothing():
    """A step asking for more pages than are free: one error naming the first request in
    allocation order that the free stack cannot serve, its pages and the pages free;
    the stack, tables and lengths stay as they were."""
    cache = PagedHeadCache(16, 4, L, H, 8, MAX_REQS)
    cache.allocate(torch.tensor([0]), torch.tensor([3]), total_tokens=3)  # 6 lists x 1 page
    before = (int(cache.num_free), cache.free_stack.clone(), cache.table.clone(), cache.lens.clone())
    rows, counts = torch.tensor([0, 1]), torch.tensor([2, 1])  # row 0 opens 6 pages, row 1 needs 6 more
    with pytest.raises(PagePoolShortError) as err:
        cache.check_allocate(rows, counts, names=["'x'", "'y'"])
    assert str(err.value).startswith(
        "head page pool short: request 'y' asks for 6 pages, 4 free (the step's earlier requests take 6; "
        "the step asks for 12 pages, 10 free); no page was moved.")
    assert (err.value.request, err.value.asked, err.value.free) == ("'y'", 6, 4)
    assert before[0] == int(cache.num_free) == 10
    assert all(torch.equal(a, b) for a, b in zip(before[1:], (cache.free_stack, cache.table, cache.lens)))
    cache.audit()
    # Without names the row is named; a step that fits returns the pages left free.
    with pytest.raises(PagePoolShortError, match=r"^head page pool short: request row 1 asks for 6 pages, 4 free"):
        cache.check_allocate(rows, counts)
    assert cache.check_allocate(torch.tensor([0]), torch.tensor([2])) == 4


def test_check_allocate_refuses_a_list_wider_than_the_page_table():
    cache = PagedHeadCache(64, 4, L, H, 2, MAX_REQS)
    with pytest.raises(RuntimeError, match=r"request 'z' would need 3 pages in one head list, more than "
                                           r"max_pages_per_list=2"):
        cache.check_allocate(torch.tensor([2]), torch.tensor([9]), names=["'z'"])
    assert int(cache.num_free) == 64
