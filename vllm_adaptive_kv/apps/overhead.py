"""``vllm-adaptive-kv overhead``: what our bookkeeping and eviction cost per engine step.

For each batch size N (default 16, 64, 256) it starts one offline vLLM engine with
the plugin and ``VLLM_ADAPTIVE_KV_TIMING=1`` (see :mod:`vllm_adaptive_kv.core.timing`),
sends N short passkey prompts at once with ``max_num_seqs = N`` and a KV budget
that holds them all, and reads the per-step timings off the KV-connector stats
(a stat logger sees every step's ``SchedulerStats``). Reported per policy and N,
over the steps that ran all N requests at once (the steady state; prefill
steps, where fewer run, are summarized apart):

    sched_ms / sched_pct   our block reservation + report handling, of the scheduler step
    plan_ms  / plan_pct    per-step planning on the worker, of the worker step
    evict_ms / evict_pct   eviction + compaction + report, of the worker step
    total_pct              the three shares added (bookkeeping plus eviction)
    score_ms / score_pct   attention-score accumulation for scoring policies, of the
                           worker step (inside the forward; FastGen's frequent-token
                           heads need it at every decode token)
    with_score_pct         total_pct + score_pct

Decode re-eviction runs once per request every block_size tokens, so the
output length must cover several pages (default 96 tokens, 3 pages of 32).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from ..core.timing import TIMING_ENV, overhead_summary

SCHEMA = "vllm-adaptive-kv/overhead/1"


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"--running={text!r} is invalid: allowed a comma-separated list of "
                                         "positive integers, e.g. 16,64,256")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-adaptive-kv overhead", description=__doc__.splitlines()[0])
    p.add_argument("--running", type=parse_counts, default=[16, 64, 256], metavar="N,N,...",
                   help="concurrent requests per run (default 16,64,256)")
    p.add_argument("--policies", default="fastgen", help="comma-separated plugin policies (default fastgen)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--output-tokens", type=int, default=96, help="output tokens per request (default 96)")
    p.add_argument("--dtype", default="bfloat16", help="(default bfloat16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="(default 4096)")
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=None, metavar="JSON", help="write the results here")
    return p


def step_recorder(steps: list):
    """Stat-logger factory: append (running, waiting, kv usage, our timing dict) per step.

    Every engine step's ``SchedulerStats``, the numbers vLLM publishes as
    ``vllm:num_requests_running`` / ``vllm:kv_cache_usage_perc``, with no polling.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepRecorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                stats = scheduler_stats.kv_connector_stats or {}
                steps.append((scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                              scheduler_stats.kv_cache_usage, dict(stats.get("timing") or {})))

        def log_engine_initialized(self):
            pass

    return StepRecorder


def kv_bytes_per_token(model_dir: str, dtype: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = 4 if dtype in ("float32", "float") else 2
    return cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * elem


def summarize(steps: list, running: int) -> dict:
    """Sum the timings over steady-state steps (all ``running`` at once) and over the rest."""
    def total(rows):
        sums: dict[str, float] = {}
        for *_, timing in rows:
            for k, v in timing.items():
                sums[k] = sums.get(k, 0.0) + v
        return overhead_summary(sums, int(sums.get("steps", 0)))

    timed = [s for s in steps if s[-1]]
    steady = [s for s in timed if s[0] == running and s[1] == 0]
    rest = [s for s in timed if not (s[0] == running and s[1] == 0)]
    return {"steady": total(steady), "other": total(rest), "all": total(timed)}


def run_one(model_dir: str, policy: str, running: int, args, workload) -> dict:
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    need = running * (args.prompt_tokens + args.output_tokens + 64)
    budget = max(need, 4096) * kv_bytes_per_token(model_dir, args.dtype)
    steps: list = []
    engine = LLMEngine.from_engine_args(
        EngineArgs(model_dir, dtype=args.dtype, max_model_len=2048, kv_cache_memory_bytes=budget,
                   max_num_seqs=running, max_num_batched_tokens=max(args.max_num_batched_tokens, running),
                   enforce_eager=True, seed=0, disable_log_stats=False,
                   additional_config={"kv_policy": policy}),
        stat_loggers=[step_recorder(steps)])
    try:
        params = SamplingParams(temperature=0, max_tokens=args.output_tokens, min_tokens=args.output_tokens,
                                ignore_eos=True)
        start = time.perf_counter()
        for i, req in enumerate(workload[:running]):
            engine.add_request(str(i), req.text, params)
        while engine.has_unfinished_requests():
            engine.step()
        wall = time.perf_counter() - start
    finally:
        engine.engine_core.shutdown()
        del engine
        gc.collect()
    row = {"policy": policy, "running": running, "wall_s": round(wall, 2), "kv_budget_bytes": budget,
           "peak_running": max((s[0] for s in steps), default=0), **summarize(steps, running)}
    return row


def format_table(rows: list[dict]) -> str:
    head = ("| policy | running | steady steps | step ms | sched ms (%) | plan ms (%) | evict ms (%) | "
            "total % | score ms (%) | with score % |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        s = r["steady"]
        if not s:
            lines.append(f"| {r['policy']} | {r['running']} | 0 | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['policy']} | {r['running']} | {s['steps']} | {s['worker_step_ms']:.1f} | "
            f"{s['sched_ms']:.2f} ({s.get('sched_pct', 0):.2f}%) | {s['plan_ms']:.2f} ({s.get('plan_pct', 0):.2f}%) | "
            f"{s['evict_ms']:.2f} ({s.get('evict_pct', 0):.2f}%) | {s.get('total_pct', 0):.2f}% | "
            f"{s['score_ms']:.2f} ({s.get('score_pct', 0):.2f}%) | {s.get('with_score_pct', 0):.2f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from ..core.config import POLICY_NAMES

    bad = [p for p in policies if p not in POLICY_NAMES]
    if bad or not policies:
        print(f"vllm-adaptive-kv overhead: --policies={args.policies!r} is invalid: allowed a comma-separated "
              f"list of {', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    if args.prompt_tokens < 64 or args.output_tokens < 1:
        print(f"vllm-adaptive-kv overhead: --prompt-tokens={args.prompt_tokens} / --output-tokens="
              f"{args.output_tokens} invalid: allowed prompt >= 64 and output >= 1", file=sys.stderr)
        return 2
    previous = os.environ.get(TIMING_ENV)
    os.environ[TIMING_ENV] = "1"  # inherited by the engine core and its workers
    try:
        return _run(args, policies)
    finally:
        if previous is None:
            os.environ.pop(TIMING_ENV, None)
        else:
            os.environ[TIMING_ENV] = previous


def _run(args, policies: list[str]) -> int:
    from .bench import build_workload, tokenizer_fns
    from .common import git_commit, machine_info
    from ..model import prepare_model

    model_dir = args.model or str(prepare_model("smollm2"))
    workload = build_workload(max(args.running), (args.prompt_tokens, args.prompt_tokens),
                              (args.output_tokens, args.output_tokens), 0, None, *tokenizer_fns(model_dir))
    doc = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_commit(),
           "machine": machine_info(), "args": vars(args), "rows": []}
    for policy in policies:
        for running in args.running:
            print(f"[overhead] {policy}: {running} requests at once", flush=True)
            doc["rows"].append(run_one(model_dir, policy, running, args, workload))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(doc, f, indent=1)
    print()
    print(format_table(doc["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
