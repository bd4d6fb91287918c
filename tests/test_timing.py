"""Opt-in overhead timing: the pure timer and summaries, and how the connector carries them."""

from __future__ import annotations

import time

import pytest

from vllm_adaptive_kv.core.timing import TIMING_ENV, StepTimer, merge_ranks, overhead_summary, timing_enabled


def test_timing_is_off_by_default_and_parses_the_env(monkeypatch):
    monkeypatch.delenv(TIMING_ENV, raising=False)
    assert timing_enabled() is False
    for value, expected in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv(TIMING_ENV, value)
        assert timing_enabled() is expected
    monkeypatch.setenv(TIMING_ENV, "maybe")
    with pytest.raises(ValueError, match=r"VLLM_ADAPTIVE_KV_TIMING='maybe' is invalid: allowed"):
        timing_enabled()


def test_disabled_timer_records_nothing():
    timer = StepTimer()
    with timer.part("evict_s"):
        time.sleep(0.001)
    assert timer.take() == {}


def test_enabled_timer_sums_parts_and_take_resets():
    synced = []
    timer = StepTimer(True, sync=lambda: synced.append(1))
    for _ in range(2):
        with timer.part("evict_s"):
            time.sleep(0.002)
    timer.add("worker_step_s", 0.5)
    got = timer.take()
    assert got["evict_s"] >= 0.004 and got["worker_step_s"] == 0.5
    assert len(synced) == 4  # before and after each timed part
    assert timer.take() == {}


def test_timer_charges_a_part_that_raises():
    timer = StepTimer(True)
    with pytest.raises(RuntimeError):
        with timer.part("plan_s"):
            raise RuntimeError("boom")
    assert "plan_s" in timer.take()


def test_merge_ranks_takes_the_slowest_rank():
    assert merge_ranks({"evict_s": 1.0, "plan_s": 0.2}, {"evict_s": 0.5, "worker_step_s": 3.0}) == {
        "evict_s": 1.0, "plan_s": 0.2, "worker_step_s": 3.0}


def test_overhead_summary_per_step_and_shares():
    totals = {"steps": 4, "sched_s": 0.004, "step_s": 0.4, "plan_s": 0.008, "evict_s": 0.012,
              "score_s": 0.04, "worker_step_s": 0.4}
    s = overhead_summary(totals, 4)
    assert s["steps"] == 4
    assert s["sched_ms"] == pytest.approx(1.0) and s["step_ms"] == pytest.approx(100.0)
    assert s["plan_ms"] == pytest.approx(2.0) and s["evict_ms"] == pytest.approx(3.0)
    assert s["sched_pct"] == pytest.approx(1.0) and s["plan_pct"] == pytest.approx(2.0)
    assert s["evict_pct"] == pytest.approx(3.0) and s["total_pct"] == pytest.approx(6.0)
    assert s["score_ms"] == pytest.approx(10.0) and s["with_score_pct"] == pytest.approx(16.0)
    assert overhead_summary(totals, 0) == {}
    assert "total_pct" not in overhead_summary({"steps": 1, "sched_s": 0.1}, 1)


def test_connector_carries_timings_over_ranks_and_steps():
    from vllm_adaptive_kv.plugin.connector import AdaptiveKVStats, ReportMeta
    from vllm_adaptive_kv.core.step import StepReport

    rank0 = ReportMeta.from_report(StepReport(timings={"evict_s": 0.01, "worker_step_s": 0.1}))
    rank1 = ReportMeta.from_report(StepReport(timings={"evict_s": 0.03, "worker_step_s": 0.09}))
    merged = rank0.aggregate(rank1)
    assert merged.timings == {"evict_s": 0.03, "worker_step_s": 0.1}

    stats = AdaptiveKVStats()
    assert stats.is_empty()
    stats.aggregate(AdaptiveKVStats(data={"timing": {"steps": 1, "sched_s": 0.001, "step_s": 0.1, **merged.timings}}))
    stats.aggregate(AdaptiveKVStats(data={"timing": {"steps": 1, "sched_s": 0.003, "step_s": 0.1,
                                                     "evict_s": 0.01, "worker_step_s": 0.1}}))
    assert not stats.is_empty()
    reduced = stats.reduce()
    assert reduced["overhead_steps"] == 2
    assert reduced["overhead_sched_ms"] == pytest.approx(2.0)
    assert reduced["overhead_evict_pct"] == pytest.approx(20.0)
    assert "overhead_steps" not in AdaptiveKVStats(data={"evicted_tokens": 3}).reduce()
