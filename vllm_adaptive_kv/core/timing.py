"""Opt-in overhead timing: what our bookkeeping and eviction cost per engine step.

Off by default. ``VLLM_ADAPTIVE_KV_TIMING=1`` in the environment of the engine
(it reaches the engine core and the workers, which inherit it) turns it on. Then
each step records, in seconds:

    scheduler (engine core)                       worker (each TP rank)
    sched_s  our block reservation (inside        plan_s   step planning: page tables,
             schedule()) + applying the workers'           per-head sequence lists
             reports (update_from_output)         evict_s  eviction + compaction + report
    step_s   from the end of schedule() to the    score_s  attention-score accumulation
             end of update_from_output, plus               for scoring policies, native CPU
             our reservation time                          path only: the prompt window's rows
                                                           (C++ score_rows), and decode rows
                                                           too without the C++ kernels (torch);
                                                           with them decode scores come inside
                                                           the attention kernel, untimed apart,
                                                           as on the torch and Triton paths
                                                  worker_step_s  execute_model up to the
                                                           report (sampling excluded)

Both step times leave out some of vLLM's own work, so the shares are upper bounds.

The sums ride the KV-connector stats to the metrics loggers: the log line and
``vllm_adaptive_kv:overhead_seconds_total{part=...}`` on /metrics. On CUDA the
worker timer synchronizes the device around each timed part, so timing perturbs
what it measures there; on CPU every op is synchronous already.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

TIMING_ENV = "VLLM_ADAPTIVE_KV_TIMING"
WORKER_PARTS = ("plan_s", "score_s", "evict_s", "worker_step_s")
SCHEDULER_PARTS = ("sched_s", "step_s")
PARTS = SCHEDULER_PARTS + WORKER_PARTS


def timing_enabled() -> bool:
    """True when ``VLLM_ADAPTIVE_KV_TIMING`` is 1/true/yes/on; raises on any other non-empty value."""
    raw = os.environ.get(TIMING_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{TIMING_ENV}={raw!r} is invalid: allowed values are 1, true, yes, on (enable) "
                     "or 0, false, no, off, empty (disable)")


@dataclass
class StepTimer:
    """Seconds per named part, accumulated until ``take()``; a no-op when disabled.

    ``sync`` runs before each clock read (``torch.cuda.synchronize`` on CUDA) so that
    asynchronous device work is charged to the part that launched it.
    """

    enabled: bool = False
    sync: Callable[[], None] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    @contextmanager
    def part(self, name: str):
        if not self.enabled:
            yield
            return
        start = self._now()
        try:
            yield
        finally:
            self.add(name, self._now() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The sums so far, and a fresh start."""
        out, self.seconds = self.seconds, {}
        return out


def merge_ranks(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """One step's worker timings over TP ranks: ranks run in parallel, the slowest counts."""
    return {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in a.keys() | b.keys()}


def overhead_summary(totals: dict[str, float], steps: int) -> dict[str, float]:
    """Per-step milliseconds and shares of the step from summed seconds over ``steps`` steps.

    ``sched_pct`` is scheduler bookkeeping over the scheduler's step time;
    ``plan_pct``, ``score_pct`` and ``evict_pct`` are over the worker's step time;
    ``total_pct`` adds sched, plan and evict (bookkeeping plus eviction), and
    ``with_score_pct`` adds the score accumulation too. Upper bounds (see above).
    """
    if steps <= 0:
        return {}
    ms = {f"{k[:-2]}_ms": 1e3 * totals.get(k, 0.0) / steps for k in PARTS}
    out = {"steps": steps, **{k: round(v, 4) for k, v in ms.items()}}
    step, worker = totals.get("step_s", 0.0), totals.get("worker_step_s", 0.0)
    if step > 0:
        out["sched_pct"] = round(100 * totals.get("sched_s", 0.0) / step, 3)
    if worker > 0:
        for part in ("plan", "score", "evict"):
            out[f"{part}_pct"] = round(100 * totals.get(f"{part}_s", 0.0) / worker, 3)
    if step > 0 and worker > 0:
        out["total_pct"] = round(out["sched_pct"] + out["plan_pct"] + out["evict_pct"], 3)
        out["with_score_pct"] = round(out["total_pct"] + out["score_pct"], 3)
    return out
