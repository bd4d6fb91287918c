"""The worker -> scheduler channel: a KV connector that moves no KV at all.

vLLM's KV connector is the one out-of-tree, two-way path between the scheduler
and every worker: each step all TP ranks reply, and their
``KVConnectorWorkerMetadata`` are merged with ``aggregate`` before the scheduler
sees them. We use it to carry ``StepReport``s (pages held per request) to the
``AdaptiveKVManager`` and our statistics to the metrics loggers::

    worker (each rank)                      scheduler (engine core)
    HeadCacheRuntime.finish_step ─┐
      set_step_report(report)     │ build_connector_worker_meta
                                  └──> ReportMeta ──aggregate over ranks──>
                                       update_connector_output -> manager.apply_report
                                       request_finished        -> kept_fraction,
                                                                  kv_transfer_params
                                       get_kv_connector_stats  -> AdaptiveKVStats
                                                                   -> /metrics, log lines

A step that runs no forward pass (vLLM's step that only hands the workers the ids
of finished and aborted requests, which is the last step before the engine goes
idle) still reports: the runner releases those requests' pages and sends the free
count, and, when no request is left, the result of a pool audit (every page free,
none owned twice). So ``pages_free`` and ``pool_audits`` are true when idle.

Each finished request's own numbers reach its output as
``RequestOutput.kv_transfer_params["adaptive_kv"]`` (offline) or the response's
``kv_transfer_params`` (``vllm serve``): ``{"kept_fraction", "slots_held", "tokens"}``,
the same figures the ``kept_fraction`` histogram observes; empty when no report came
(a request aborted before its first step). vLLM builds the request's output from the
dict ``request_finished`` returns before the step's reports are applied, so that dict
is filled in place once they are (the same ``update_from_output`` call, before the
outputs leave the engine core).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from ..core.step import RequestReport, StepReport
from ..core.timing import PARTS, merge_ranks, overhead_summary, timing_enabled
from .spec import AdaptiveKVManager

KEPT_FRACTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class EmptyMeta(KVConnectorMetadata):
    """Scheduler -> worker: nothing; the runner reads the SchedulerOutput itself."""


@dataclass
class ReportMeta(KVConnectorWorkerMetadata):
    """One step's reports of one rank, or of several ranks once aggregated.

    requests: req_id -> RequestReport; ranks merge by ``RequestReport.merge`` (pages
    and full lists take the fullest rank, which the scheduler must fit; slots add up).
    timings: worker seconds per part (opt-in), the slowest rank's.
    pool_audits: idle-pool audits run (one per rank; see ``audit_idle_pool``).
    audit_failures: what those audits found wrong, one line each (empty: clean).
    """

    requests: dict[str, RequestReport] = field(default_factory=dict)
    evicted_tokens: int = 0
    head_policy: dict[str, int] = field(default_factory=dict)
    pages_free: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    pool_audits: int = 0
    audit_failures: list[str] = field(default_factory=list)

    @classmethod
    def from_report(cls, report: StepReport, audit_failures: list[str] | None = None) -> "ReportMeta":
        """``audit_failures``: None when the step ran no pool audit, else its findings."""
        return cls(dict(report.requests), report.evicted_tokens,
                   dict(report.head_policy_counts), report.pages_free, dict(report.timings),
                   pool_audits=int(audit_failures is not None), audit_failures=list(audit_failures or ()))

    def aggregate(self, other: "ReportMeta") -> "ReportMeta":
        merged = dict(self.requests)
        for req_id, theirs in other.requests.items():
            merged[req_id] = merged[req_id].merge(theirs) if req_id in merged else theirs
        policy = Counter(self.head_policy) + Counter(other.head_policy)
        return ReportMeta(merged, self.evicted_tokens + other.evicted_tokens, dict(policy),
                          self.pages_free + other.pages_free, merge_ranks(self.timings, other.timings),
                          pool_audits=self.pool_audits + other.pool_audits,
                          audit_failures=self.audit_failures + other.audit_failures)


@dataclass
class AdaptiveKVStats(KVConnectorStats):
    """Stats since the last read: kept fractions of finished requests, evicted
    tokens, per-head decisions, the latest free page count, idle-pool audits run and
    failed and, when timing is on, summed seconds per part with the number of timed
    steps (``timing``)."""

    def __post_init__(self) -> None:
        self.data.setdefault("kept_fraction", [])
        self.data.setdefault("evicted_tokens", 0)
        self.data.setdefault("head_policy", {})
        self.data.setdefault("pages_free", None)
        self.data.setdefault("pool_audits", 0)
        self.data.setdefault("pool_audit_failures", 0)
        self.data.setdefault("timing", {})

    def reset(self) -> None:
        self.data = {}
        self.__post_init__()

    def aggregate(self, other: "KVConnectorStats") -> "KVConnectorStats":
        data = other.data
        self.data["kept_fraction"] = self.data["kept_fraction"] + list(data.get("kept_fraction", []))
        self.data["evicted_tokens"] += int(data.get("evicted_tokens", 0))
        self.data["head_policy"] = dict(Counter(self.data["head_policy"]) + Counter(data.get("head_policy", {})))
        if data.get("pages_free") is not None:
            self.data["pages_free"] = data["pages_free"]
        for name in ("pool_audits", "pool_audit_failures"):
            self.data[name] += int(data.get(name, 0))
        self.data["timing"] = dict(Counter(self.data["timing"]) + Counter(data.get("timing", {})))
        return self

    def reduce(self) -> dict[str, int | float]:
        kept = self.data["kept_fraction"]
        out: dict[str, int | float] = {"evicted_tokens": self.data["evicted_tokens"]}
        if kept:
            out["finished"] = len(kept)
            out["mean_kept_fraction"] = round(sum(kept) / len(kept), 4)
        if self.data["pages_free"] is not None:
            out["pages_free"] = self.data["pages_free"]
        for name in ("pool_audits", "pool_audit_failures"):
            if self.data[name]:
                out[name] = self.data[name]
        for name, count in sorted(self.data["head_policy"].items()):
            out[f"heads_{name}"] = count
        timing = self.data["timing"]
        for name, value in overhead_summary(timing, int(timing.get("steps", 0))).items():
            out[f"overhead_{name}"] = value
        return out

    def is_empty(self) -> bool:
        d = self.data
        return (not d["kept_fraction"] and not d["evicted_tokens"] and not d["head_policy"]
                and d["pages_free"] is None and not d["pool_audits"] and not d["pool_audit_failures"]
                and not d["timing"])


def unregister_adaptive_metrics() -> None:
    """Drop our collectors from the default registry, as vLLM does for its own."""
    import prometheus_client

    registry = prometheus_client.REGISTRY
    for collector in list(registry._collector_to_names):
        if any(n.startswith("vllm_adaptive_kv:") for n in registry._collector_to_names[collector]):
            registry.unregister(collector)


class AdaptiveKVPromMetrics(KVConnectorPromMetrics):
    """``vllm_adaptive_kv:*`` metrics on the server's /metrics."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        unregister_adaptive_metrics()  # a second engine in one process re-creates them
        self.kept = self._histogram_cls(
            name="vllm_adaptive_kv:kept_fraction", buckets=list(KEPT_FRACTION_BUCKETS),
            documentation="KV tokens held at a request's end over what the full cache would hold "
                          "(summed over layers and KV heads); one observation per finished request.",
            labelnames=labelnames)
        self.evicted = self._counter_cls(
            name="vllm_adaptive_kv:evicted_tokens", labelnames=labelnames,
            documentation="Per-(layer, KV head) token slots evicted.")
        self.head_policy = self._counter_cls(
            name="vllm_adaptive_kv:head_policy", labelnames=labelnames + ["policy"],
            documentation="Per-(layer, KV head) policy decisions at the end of a prompt.")
        self.pages_free = self._gauge_cls(
            name="vllm_adaptive_kv:pages_free", labelnames=labelnames, multiprocess_mode="mostrecent",
            documentation="Free per-(layer, KV head) pages in the pool (all TP ranks); refreshed after "
                          "every step, including the last one before the engine goes idle.")
        self.pool_audits = self._counter_cls(
            name="vllm_adaptive_kv:pool_audits", labelnames=labelnames,
            documentation="Audits of the page pool run when the engine went idle (one per TP rank): every "
                          "page must be free and none owned twice.")
        self.pool_audit_failures = self._counter_cls(
            name="vllm_adaptive_kv:pool_audit_failures", labelnames=labelnames,
            documentation="Idle-pool audits that found a page leaked, held or owned twice; the worker "
                          "logs what it found at ERROR level.")
        for labels in per_engine_labelvalues.values():  # on /metrics from the start, at 0
            self.pool_audits.labels(*labels)
            self.pool_audit_failures.labels(*labels)
        self.overhead = self._counter_cls(
            name="vllm_adaptive_kv:overhead_seconds", labelnames=labelnames + ["part"],
            documentation="Opt-in (VLLM_ADAPTIVE_KV_TIMING=1) seconds per part: sched (our block "
                          "reservation and report handling), step (scheduler step), plan, score (attention-score "
                          "accumulation), evict (eviction and compaction), worker_step (execute_model); "
                          "see vllm_adaptive_kv.core.timing.")
        self.timed_steps = self._counter_cls(
            name="vllm_adaptive_kv:timed_steps", labelnames=labelnames,
            documentation="Opt-in (VLLM_ADAPTIVE_KV_TIMING=1) engine steps covered by overhead_seconds.")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for value in transfer_stats_data.get("kept_fraction", []):
            self.kept.labels(*labels).observe(value)
        evicted = int(transfer_stats_data.get("evicted_tokens", 0))
        if evicted:
            self.evicted.labels(*labels).inc(evicted)
        for name, count in transfer_stats_data.get("head_policy", {}).items():
            self.head_policy.labels(*labels, name).inc(count)
        if transfer_stats_data.get("pages_free") is not None:
            self.pages_free.labels(*labels).set(transfer_stats_data["pages_free"])
        for counter, name in ((self.pool_audits, "pool_audits"), (self.pool_audit_failures, "pool_audit_failures")):
            if transfer_stats_data.get(name):
                counter.labels(*labels).inc(transfer_stats_data[name])
        timing = transfer_stats_data.get("timing") or {}
        for part in PARTS:
            if timing.get(part):
                self.overhead.labels(*labels, part[:-2]).inc(timing[part])
        if timing.get("steps"):
            self.timed_steps.labels(*labels).inc(timing["steps"])


class AdaptiveKVConnector(KVConnectorBase_V1):
    """Scheduler and worker halves of the report channel (see the module docstring)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._pending_report: StepReport | None = None
        self._pending_audit: list[str] | None = None
        self._manager: AdaptiveKVManager | None = None
        self._last: dict[str, RequestReport] = {}
        self._finishing: dict[str, dict[str, Any]] = {}  # req id -> its output's params, filled later
        self._stats = AdaptiveKVStats()
        self._total_lists = self._count_lists(vllm_config, kv_cache_config)
        self._timing = timing_enabled()
        self._reserve_s = 0.0  # our block reservation inside this step's schedule()
        self._scheduled_at: float | None = None  # end of this step's schedule()

    @staticmethod
    def _count_lists(vllm_config, kv_cache_config) -> int:
        """L x H over all TP ranks: the denominator of kept_fraction."""
        if kv_cache_config is None or not kv_cache_config.kv_cache_groups:
            return 0
        group = kv_cache_config.kv_cache_groups[0]
        tp = vllm_config.parallel_config.tensor_parallel_size
        return len(group.layer_names) * group.kv_cache_spec.num_kv_heads * tp

    # --- worker side ------------------------------------------------------------

    def set_step_report(self, report: StepReport, audit_failures: list[str] | None = None) -> None:
        """This step's report; ``audit_failures`` only from an idle-pool audit (None: none ran)."""
        self._pending_report = report
        self._pending_audit = audit_failures

    def build_connector_worker_meta(self) -> ReportMeta | None:
        report, self._pending_report = self._pending_report, None
        audit, self._pending_audit = self._pending_audit, None
        return ReportMeta.from_report(report, audit) if report is not None else None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    # --- scheduler side -----------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        managers = [m for m in kv_cache_manager.coordinator.single_type_managers
                    if isinstance(m, AdaptiveKVManager)]
        if len(managers) != 1:
            raise RuntimeError(f"expected one AdaptiveKVManager, found {len(managers)}: "
                               "the attention backend did not mark the KV-cache spec")
        self._manager = managers[0]
        tp = self._vllm_config.parallel_config.tensor_parallel_size
        self._manager.configure(self._total_lists // tp)
        if self._timing:
            self._time_reservations(self._manager)

    def _time_reservations(self, manager: AdaptiveKVManager) -> None:
        """Charge the manager's reservation calls to this step's ``sched_s`` (timing on)."""
        for name in ("get_num_blocks_to_allocate", "allocate_new_blocks"):
            method = getattr(manager, name)

            def timed(*args, _method=method, **kwargs):
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self._reserve_s += time.perf_counter() - start

            setattr(manager, name, timed)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        if self._timing:  # schedule() ends here
            self._scheduled_at = time.perf_counter()
        return EmptyMeta()

    def update_connector_output(self, connector_output) -> None:
        start = time.perf_counter()
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, ReportMeta):
            self._apply(meta)
        for req_id, params in self._finishing.items():
            self._observe_finished(req_id, params)
        self._finishing.clear()
        if self._timing and self._scheduled_at is not None:
            self._record_step_timing(start, meta.timings if isinstance(meta, ReportMeta) else {})

    def _record_step_timing(self, update_start: float, worker: dict[str, float]) -> None:
        end = time.perf_counter()
        step = {"steps": 1, "sched_s": self._reserve_s + (end - update_start),
                "step_s": self._reserve_s + (end - self._scheduled_at), **worker}
        self._stats.data["timing"] = dict(Counter(self._stats.data["timing"]) + Counter(step))
        self._reserve_s, self._scheduled_at = 0.0, None

    def _apply(self, meta: ReportMeta) -> None:
        for req_id, report in meta.requests.items():
            self._last[req_id] = report
            if self._manager is not None:
                self._manager.apply_report(req_id, report)
        self._stats.aggregate(AdaptiveKVStats(data={
            "evicted_tokens": meta.evicted_tokens, "head_policy": meta.head_policy,
            "pages_free": meta.pages_free, "pool_audits": meta.pool_audits,
            "pool_audit_failures": len(meta.audit_failures)}))

    def request_finished(self, request, block_ids):
        # The request's last report comes with this step's output, after this call:
        # hand vLLM a dict now and fill it then (see the module docstring).
        params: dict[str, Any] = {}
        self._finishing[request.request_id] = params
        return False, {"adaptive_kv": params}

    def _observe_finished(self, req_id: str, params: dict[str, Any]) -> None:
        report = self._last.pop(req_id, None)
        if report is None or not self._total_lists or report.tokens <= 0:
            return
        kept = report.slots_held / (report.tokens * self._total_lists)
        self._stats.data["kept_fraction"].append(kept)
        params.update(kept_fraction=kept, slots_held=report.slots_held, tokens=report.tokens)

    def get_kv_connector_stats(self) -> AdaptiveKVStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, AdaptiveKVStats()
        return stats

    # --- loggers (frontend) -----------------------------------------------------------

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> AdaptiveKVStats:
        return AdaptiveKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return AdaptiveKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
