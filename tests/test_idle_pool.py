"""The pool report of an idle engine (issue 13, point 5), without an engine.

vLLM hands the workers the ids of finished and aborted requests with the step
after they finish; with nothing else to run that step has no forward pass. The
runner then reports the free pages and, with no request left, an audit of the
whole pool. Here: the audit's findings and how the reports travel to /metrics.
The server-side check is in tests/test_reliability_server.py.
"""

from __future__ import annotations

import torch

from vllm_adaptive_kv.core.paging import PagedHeadCache
from vllm_adaptive_kv.core.step import StepReport
from vllm_adaptive_kv.plugin.connector import AdaptiveKVStats, ReportMeta
from vllm_adaptive_kv.plugin.runner import audit_idle_pool


def small_cache() -> PagedHeadCache:
    return PagedHeadCache(num_pages=24, block_size=4, num_layers=2, num_kv_heads=2, max_pages_per_list=4, max_reqs=2)


def test_a_free_pool_passes_the_idle_audit():
    cache = small_cache()
    rows, counts = torch.tensor([0]), torch.tensor([5])
    cache.allocate(rows, counts, total_tokens=5)
    cache.release(rows)
    assert audit_idle_pool(cache) == []


def test_pages_still_held_when_idle_are_named():
    cache = small_cache()
    cache.allocate(torch.tensor([1]), torch.tensor([5]), total_tokens=5)  # 2 pages in each of 4 lists
    failures = audit_idle_pool(cache)
    assert failures == ["8 of 24 head pages are not free with no live request (8 owned by a page list)"]


def test_a_corrupt_pool_fails_the_audit_with_its_reason():
    cache = small_cache()
    cache.num_free -= 1  # a page neither free nor owned
    [failure] = audit_idle_pool(cache)
    assert "leaked" in failure


def test_audits_add_up_over_ranks_and_reach_the_stats():
    clean = ReportMeta.from_report(StepReport(pages_free=24), [])
    broken = ReportMeta.from_report(StepReport(pages_free=16), ["8 of 24 head pages are not free"])
    no_audit = ReportMeta.from_report(StepReport(pages_free=24))
    assert no_audit.pool_audits == 0 and no_audit.audit_failures == []
    merged = clean.aggregate(broken)
    assert (merged.pages_free, merged.pool_audits, merged.audit_failures) == (40, 2, ["8 of 24 head pages are not free"])
    stats = AdaptiveKVStats()
    assert stats.is_empty()
    stats.aggregate(AdaptiveKVStats(data={"pages_free": 40, "pool_audits": 2, "pool_audit_failures": 1}))
    assert not stats.is_empty()
    assert stats.reduce()["pool_audits"] == 2 and stats.reduce()["pool_audit_failures"] == 1
