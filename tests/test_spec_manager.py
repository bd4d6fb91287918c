"""The scheduler-side block manager (plugin/spec.py) on real vLLM objects, no engine.

``AdaptiveKVManager`` is built the way the engine builds it: from an ``AdaptiveKVSpec``
in a ``KVCacheConfig``, by vLLM's ``KVCacheManager``, which owns the ``BlockPool``
and calls the manager from ``allocate_slots`` / ``free``. Requests are real vLLM
``Request`` objects; a step is what the scheduler does for one request::

    allocate_slots(request, k)  ->  (worker writes k tokens, may evict)  ->  apply_report

The worker side is a model: the slot count of every (layer, KV head) list of every
TP rank. One block stands for LISTS head pages of a rank (``configure``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request, RequestStatus

from vllm_adaptive_kv.core.attention import attention_path
from vllm_adaptive_kv.core.layout import KVPool
from vllm_adaptive_kv.core.runtime import HeadCacheRuntime, RowState
from vllm_adaptive_kv.core.step import RequestReport, StepReport
from vllm_adaptive_kv.plugin.connector import ReportMeta
from vllm_adaptive_kv.plugin.spec import AdaptiveKVManager, AdaptiveKVSpec

BS = 4  # tokens per block and per head page
LAYERS, KV_HEADS = 2, 3
LISTS = LAYERS * KV_HEADS  # head pages per block, on one rank


def make_manager(num_blocks: int = 64, max_model_len: int = 1024) -> tuple[KVCacheManager, AdaptiveKVManager]:
    """vLLM's KVCacheManager over one AdaptiveKVSpec group; its manager configured as the connector does."""
    spec = AdaptiveKVSpec(block_size=BS, num_kv_heads=KV_HEADS, head_size=8, dtype=torch.float16)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec([f"layer.{i}" for i in range(LAYERS)], spec)])
    kv = KVCacheManager(config, max_model_len=max_model_len, scheduler_block_size=BS, hash_block_size=BS,
                        enable_caching=False)
    (manager,) = kv.coordinator.single_type_managers
    assert isinstance(manager, AdaptiveKVManager)
    manager.configure(LISTS)
    return kv, manager


def make_request(req_id: str, prompt_len: int) -> Request:
    return Request(req_id, list(range(prompt_len)), SamplingParams(max_tokens=1000), None)


def run(kv: KVCacheManager, request: Request, k: int) -> list[int] | None:
    """Schedule k tokens of the request (decode: one output token first); None = no room."""
    if request.num_computed_tokens + k > request.num_tokens:
        request.append_output_token_ids([7] * (request.num_computed_tokens + k - request.num_tokens))
    blocks = kv.allocate_slots(request, k)
    if blocks is None:
        return None
    request.num_computed_tokens += k
    return blocks.get_block_ids()[0]


def real_blocks(manager: AdaptiveKVManager, req_id: str) -> int:
    return sum(not b.is_null for b in manager.req_to_blocks.get(req_id, ()))


def report_of(lens: list[int], tokens: int) -> RequestReport:
    """What one rank's worker reports for lists of these slot counts (runtime._report)."""
    return RequestReport(pages_held=sum(-(-n // BS) for n in lens), full_lists=sum(n % BS == 0 for n in lens),
                         slots_held=sum(lens), tokens=tokens)


def pages_after(lens: list[int], k: int) -> int:
    """Pages the lists hold once each grew by k slots (what the worker's step allocates up to)."""
    return sum(-(-(n + k) // BS) for n in lens)


def free_blocks(kv: KVCacheManager) -> int:
    return kv.block_pool.get_num_free_blocks()


# --- the reservation rule ----------------------------------------------------------


def test_prefill_reserves_vanilla_blocks_until_the_first_report():
    kv, manager = make_manager()
    request = make_request("r", 10)
    ids = run(kv, request, 10)
    assert len(ids) == 3 and 0 not in ids  # ceil(10 / 4) real blocks, none null
    assert manager.reserved_blocks("r", 10) == 3 and manager.reserved_blocks("r", 13) == 4
    assert free_blocks(kv) == 64 - 1 - 3  # block 0 is vLLM's null block


@pytest.mark.parametrize("pages_held,full_lists,tokens,num_tokens,expected", [
    (6, 6, 4, 5, 2),  # every list full: the next token opens 6 pages -> 12 pages, 2 blocks
    (6, 0, 12, 13, 1),  # compressed lists with room: no page opens; vanilla would be 4 blocks
    (7, 2, 12, 13, 2),  # 2 full lists open a page each: 9 pages
    (6, 2, 12, 17, 3),  # k=5: 2 x ceil(5/4) + 4 x ceil(4/4) = 8 more pages -> 14, 3 blocks
    (24, 6, 16, 17, 5),  # nothing evicted: the rule meets vanilla's ceil(17/4) = 5
    (24, 6, 16, 16, 4),  # k=0: what it holds
    (6, 0, 12, 8, 1),  # fewer tokens than reported (k clipped at 0): what it holds, capped by vanilla's 2
    (30, 6, 16, 17, 5),  # the bound (36 pages, 6 blocks) is capped at vanilla's positions
])
def test_reservation_rule_after_a_report(pages_held, full_lists, tokens, num_tokens, expected):
    kv, manager = make_manager()
    request = make_request("r", tokens)
    run(kv, request, tokens)
    manager.held["r"] = RequestReport(pages_held, full_lists, 0, tokens)
    assert manager.reserved_blocks("r", num_tokens) == expected


def test_reservation_before_configure_is_vanilla():
    """An unconfigured manager (the connector has not bound it yet) reserves as vLLM does."""
    kv, manager = make_manager()
    manager.lists_per_block = 0
    manager.held["r"] = RequestReport(1, 0, 1, 40)
    assert manager.reserved_blocks("r", 41) == 11
    with pytest.raises(ValueError, match="lists_per_block=0 must be positive"):
        manager.configure(0)


# --- reports that shrink and grow a request; null-block positions ---------------------


def test_report_that_shrinks_frees_tail_blocks_and_leaves_null_positions():
    kv, manager = make_manager()
    request = make_request("r", 40)
    ids = run(kv, request, 40)  # 10 blocks
    assert manager.apply_report("r", RequestReport(13, 1, 40, 40)) == 7  # ceil(13 / 6) = 3 kept
    blocks = manager.req_to_blocks["r"]
    assert len(blocks) == 10, "the list keeps vanilla's positional length"
    assert [b.block_id for b in blocks[:3]] == ids[:3] and all(b.is_null for b in blocks[3:])
    assert free_blocks(kv) == 63 - 3
    assert kv.block_pool.get_usage() == pytest.approx(3 / 63)
    assert manager.apply_report("r", RequestReport(13, 1, 40, 40)) == 0  # the same report again: nothing


def test_report_that_grows_gets_blocks_into_null_positions_first():
    """A request whose lists grow again: the rule reserves more, and new real blocks fill
    the earliest null positions; only positions past the list's end are new entries."""
    kv, manager = make_manager()
    request = make_request("r", 40)
    run(kv, request, 40)
    manager.apply_report("r", RequestReport(13, 1, 40, 40))  # 3 real, 7 null positions
    ids = run(kv, request, 1)  # 41 tokens: 13 + 1 pages fit 3 blocks; position 11 is null
    assert ids == [0] and real_blocks(manager, "r") == 3 and len(manager.req_to_blocks["r"]) == 11
    assert manager.apply_report("r", RequestReport(18, 6, 41, 41)) == 0  # grew: 18 pages, all full
    before = free_blocks(kv)
    ids = run(kv, request, 1)  # 18 + 6 = 24 pages -> 4 blocks: one more, into position 3
    blocks = manager.req_to_blocks["r"]
    assert ids == [] and free_blocks(kv) == before - 1
    assert [b.is_null for b in blocks] == [False] * 4 + [True] * 7


def test_unreported_requests_and_late_reports_are_ignored():
    kv, manager = make_manager()
    assert manager.apply_report("gone", RequestReport(6, 6, 24, 4)) == 0
    assert "gone" not in manager.held and "gone" not in manager.req_to_blocks


# --- free and preemption -----------------------------------------------------------------


def test_free_returns_every_real_block_and_forgets_the_report():
    kv, manager = make_manager()
    request = make_request("r", 40)
    run(kv, request, 40)
    manager.apply_report("r", RequestReport(13, 1, 40, 40))
    kv.free(request)
    assert free_blocks(kv) == 63 and "r" not in manager.held and "r" not in manager.req_to_blocks
    assert manager.apply_report("r", RequestReport(13, 1, 40, 40)) == 0, "a report after the free"
    assert "r" not in manager.held and free_blocks(kv) == 63


def test_preempted_request_restarts_with_the_vanilla_reservation():
    """vLLM preempts by freeing the request and recomputing it from token 0: the old
    report must not shrink the recomputed prompt's reservation."""
    kv, manager = make_manager()
    request = make_request("r", 40)
    run(kv, request, 40)
    manager.apply_report("r", RequestReport(6, 0, 12, 40))  # compressed to 1 block
    run(kv, request, 1)
    kv.free(request)  # Scheduler._preempt_request
    request.status, request.num_computed_tokens = RequestStatus.PREEMPTED, 0
    ids = run(kv, request, request.num_tokens)  # 41 tokens again, no report yet
    assert len(ids) == 11 and 0 not in ids and real_blocks(manager, "r") == 11


def test_deferred_free_forgets_the_report():
    """pop_blocks_for_free (vLLM's deferred free) drops the report with the blocks."""
    kv, manager = make_manager()
    request = make_request("r", 8)
    run(kv, request, 8)
    manager.apply_report("r", RequestReport(12, 6, 48, 8))
    blocks = manager.pop_blocks_for_free("r")
    kv.block_pool.free_blocks(reversed(blocks))
    assert "r" not in manager.held and free_blocks(kv) == 63


# --- merge across TP ranks ---------------------------------------------------------------------


def test_merge_takes_the_fuller_rank_and_adds_slots():
    rank0, rank1 = RequestReport(10, 2, 30, 40), RequestReport(8, 5, 25, 40)
    assert rank0.merge(rank1) == RequestReport(10, 5, 55, 40)
    assert rank1.merge(rank0) == rank0.merge(rank1)


def test_report_meta_aggregates_ranks_for_the_manager():
    """The connector's per-step meta: requests merge by RequestReport.merge (one only on a
    rank stays as it is), counts add; the manager then keeps the fuller rank's blocks."""
    meta0 = ReportMeta.from_report(StepReport(requests={"a": RequestReport(13, 1, 30, 40), "b": RequestReport(
        6, 6, 24, 4)}, evicted_tokens=5, head_policy_counts={"full": 2}, pages_free=100))
    meta1 = ReportMeta.from_report(StepReport(requests={"a": RequestReport(7, 4, 20, 40)}, evicted_tokens=3,
                                              head_policy_counts={"full": 1, "local": 1}, pages_free=90))
    merged = meta0.aggregate(meta1)
    assert merged.requests == {"a": RequestReport(13, 4, 50, 40), "b": RequestReport(6, 6, 24, 4)}
    assert (merged.evicted_tokens, merged.head_policy, merged.pages_free) == (8, {"full": 3, "local": 1}, 190)
    kv, manager = make_manager()
    request = make_request("a", 40)
    run(kv, request, 40)
    manager.apply_report("a", merged.requests["a"])
    assert real_blocks(manager, "a") == 3  # ceil(13 / 6): rank 0's pages
    assert manager.reserved_blocks("a", 41) == 3  # 13 + 4 full lists = 17 pages


# --- model test: the scheduler against a model of the worker --------------------------------


class WorkerModel:
    """Slot counts of every list of one request on every TP rank."""

    def __init__(self, ranks: int) -> None:
        self.lens = [[0] * LISTS for _ in range(ranks)]
        self.tokens = 0

    def grow(self, k: int) -> None:
        self.lens = [[n + k for n in rank] for rank in self.lens]
        self.tokens += k

    def evict(self, data) -> None:
        """Each list keeps any number of its slots (a policy's choice; lists differ per rank)."""
        self.lens = [[data.draw(st.integers(0, n)) for n in rank] for rank in self.lens]

    def merged_report(self) -> RequestReport:
        """The ranks' reports combined as the connector combines them (ReportMeta.aggregate)."""
        metas = [ReportMeta(requests={"r": report_of(rank, self.tokens)}) for rank in self.lens]
        merged = metas[0]
        for meta in metas[1:]:
            merged = merged.aggregate(meta)
        return merged.requests["r"]


ops = st.lists(st.tuples(st.sampled_from(["step"] * 6 + ["preempt", "finish"]), st.integers(0, 2),
                         st.integers(1, 20), st.booleans()), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, ranks=st.sampled_from([1, 2]), num_blocks=st.integers(4, 30),
       prompts=st.lists(st.integers(1, 40), min_size=3, max_size=3), data=st.data())
def test_reservation_covers_the_worker_and_keeps_no_surplus(ops, ranks, num_blocks, prompts, data):
    """Random chunked prompts, decode steps, evictions that differ per TP rank, preemptions
    and finishes over a small BlockPool. After every allocation each rank's lists fit in the
    request's real blocks (the worker never needs more than the scheduler reserved); after
    every report the request holds exactly ceil(pages / LISTS) real blocks (no surplus),
    at the front of a list of vanilla's positional length; no block leaks."""
    kv, manager = make_manager(num_blocks)
    requests = [make_request(f"r{i}", n) for i, n in enumerate(prompts)]
    workers = [WorkerModel(ranks) for _ in requests]
    finished: set[int] = set()
    for kind, i, chunk, evict in ops:
        request, worker = requests[i], workers[i]
        if i in finished:
            continue
        event(kind)
        if kind != "step":
            kv.free(request)
            if kind == "finish":
                finished.add(i)
            request.status, request.num_computed_tokens = RequestStatus.PREEMPTED, 0
            workers[i] = WorkerModel(ranks)
        else:
            remaining = request.num_tokens - request.num_computed_tokens
            k = min(chunk, remaining) if remaining else 1
            if run(kv, request, k) is None:
                event("no room")
                continue  # no room: the scheduler would wait or preempt
            real = real_blocks(manager, request.request_id)
            need = max(pages_after(lens, k) for lens in worker.lens)
            assert need <= real * LISTS, f"reserved {real} blocks, the worker can need {need} pages"
            worker.grow(k)
            if evict:
                worker.evict(data)
            report = worker.merged_report()
            event("blocks freed by a report" if manager.apply_report(request.request_id, report) else "none freed")
            blocks = manager.req_to_blocks[request.request_id]
            real = real_blocks(manager, request.request_id)
            assert real == math.ceil(report.pages_held / LISTS), "surplus blocks kept after a report"
            assert len(blocks) == math.ceil(worker.tokens / BS)
            assert all(not b.is_null for b in blocks[:real]) and all(b.is_null for b in blocks[real:])
        held = sum(real_blocks(manager, r.request_id) for r in requests)
        assert free_blocks(kv) + held == num_blocks - 1, "a block leaked or was freed twice"
    for request in requests:
        kv.free(request)
    assert free_blocks(kv) == num_blocks - 1 and not manager.held


# --- both halves: the scheduler's reservation against the real worker runtime ---------------------


def make_worker(num_blocks: int, policy: str, **settings) -> HeadCacheRuntime:
    """A HeadCacheRuntime over the pages of the blocks the scheduler can hand out.

    The plugin's pool also holds the pages of vLLM's null block (block 0), which the
    scheduler never reserves: left out here, the pool has no slack, and a reservation
    one page short shows.
    """
    pool = KVPool.allocate((num_blocks - 1) * LISTS, BS, 8, torch.float32)
    return HeadCacheRuntime(pool, LAYERS, KV_HEADS, 1, max_reqs=4, max_model_len=1024,
                            token_flags=torch.zeros(16, dtype=torch.uint8),
                            default_settings={"kv_policy": policy, **settings}, attention=attention_path("torch"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(4, 30), prompts=st.lists(st.integers(1, 40), min_size=3, max_size=3),
       policy=st.sampled_from([("full", {}), ("h2o", {"budget_ratio": 0.3}),
                               ("streamingllm", {"budget_ratio": 0.5})]))
def test_worker_steps_within_the_reservation_need_no_device_read(ops, num_blocks, prompts, policy):
    """The scheduler (vLLM's KVCacheManager with our manager) batches the requests that get
    blocks; the real runtime plans, evicts and reports each step, and the reports go back to
    the manager. Each request's host bound in the runtime (its pages plus what the step can
    pop) fits in the blocks the scheduler reserved for it, so no step is ever short and the
    runtime proves every step without the exact check (on CUDA: no host read for it).
    Without attention these policies keep lists of one length per request; lists that
    differ are the next test's."""
    kv, manager = make_manager(num_blocks)
    worker = make_worker(num_blocks, policy[0], **policy[1])
    exact_checks = []
    check_allocate = worker.cache.check_allocate  # this worker's own: counted, then run
    worker.cache.check_allocate = lambda *a, **k: exact_checks.append(a) or check_allocate(*a, **k)
    requests = [make_request(f"r{i}", n) for i, n in enumerate(prompts)]
    finished: set[int] = set()
    for kind, i, chunk, _ in ops:
        if i in finished:
            continue
        if kind != "step":  # the scheduler frees; the worker releases at its next step
            kv.free(requests[i])
            worker.release([requests[i].request_id])
            requests[i].status, requests[i].num_computed_tokens = RequestStatus.PREEMPTED, 0
            finished |= {i} if kind == "finish" else set()
            continue
        batch, counts = [], []
        for j, request in enumerate(requests):  # this step: every live request that gets blocks
            remaining = request.num_tokens - request.num_computed_tokens
            k = min(chunk, remaining) if remaining else 1
            if j not in finished and run(kv, request, k) is not None:
                batch.append(request.request_id)
                counts.append(k)
                if request.request_id not in worker.rows:
                    worker.add(request.request_id, prompt_len=request.num_prompt_tokens)
        if not batch:
            continue
        for req_id, k in zip(batch, counts):  # the worker's host bound within the reservation
            state = worker.state[worker.rows[req_id]]
            assert state.pages_held + worker._pages_bound([state], [k]) <= real_blocks(manager, req_id) * LISTS
        total = sum(counts)
        report = worker.finish_step(worker.plan_step(batch, counts, torch.arange(total),
                                                     torch.zeros(total, dtype=torch.int64)))
        for req_id, request_report in report.requests.items():
            manager.apply_report(req_id, request_report)
        worker.cache.audit()
    assert not exact_checks, "a step the scheduler reserved for needed the exact (device-reading) check"


@settings(max_examples=200, deadline=None)
@given(lens=st.lists(st.integers(0, 60), min_size=LISTS, max_size=LISTS), extra=st.integers(0, 20),
       k=st.integers(1, 20))
def test_worker_bound_lies_between_its_need_and_the_reservation(lens, extra, k):
    """For any lists (any policy's result, differing per head) and k new tokens: the pages
    the lists really take <= the runtime's host bound, and the bound plus the pages held
    fits in the blocks the scheduler reserves from the same report."""
    worker, (kv, manager) = make_worker(8, "full"), make_manager()
    tokens = max(lens) + extra
    report = report_of(lens, tokens)
    state = RowState("r", worker.default_config, tokens, tokens=tokens, longest=max(lens),
                     pages_held=report.pages_held, full_lists=report.full_lists)
    manager.held["r"] = report
    bound = worker._pages_bound([state], [k])
    assert pages_after(lens, k) - report.pages_held <= bound
    assert report.pages_held + bound <= manager.reserved_blocks("r", tokens + k) * LISTS
