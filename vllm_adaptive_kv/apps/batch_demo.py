"""`make demo`: what the plugin is for: more requests at once in the same KV memory.

One offline vLLM engine per configuration (``vanilla``: vLLM as it comes, without
prefix caching as the plugin runs; ``fastgen``: the plugin) serves the same passkey
requests, all at once, at a KV budget that holds only a few whole requests
(``--budget-requests``, default 2.5: vanilla can run 2 at a time). FastGen compresses
each prompt once it is encoded and gives whole pages back, so more requests fit.

Printed per configuration: peak and mean running requests (every engine step's
scheduler stats, as vLLM publishes them), output tokens/s and wall time, passkey
accuracy; for the plugin also the KV kept at each request's end (against the full
cache), head pages freed and whether every page was back in the pool afterwards.
Engine start-up is not timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

from .common import metrics_delta, registry_metrics

CONFIGS = {"vanilla": None, "full": "full", "fastgen": "fastgen"}
ROUND_TOKENS = 128  # budgets count whole 128-token blocks per request (vLLM CPU's default block size)


def build_parser() -> argparse.ArgumentParser:
    from .bench import _positive, _typed, parse_range

    p = argparse.ArgumentParser(prog="vllm-adaptive-kv demo", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="vanilla,fastgen",
                   help="comma-separated, from vanilla, full, fastgen (default vanilla,fastgen)")
    p.add_argument("--requests", type=_positive(int), default=8, help="passkey requests (default 8)")
    p.add_argument("--prompt-tokens", type=_typed(lambda t: parse_range("--prompt-tokens", t, 64)),
                   default="500:600", metavar="LO:HI", help="prompt tokens, drawn uniformly (default 500:600)")
    p.add_argument("--max-tokens", type=_positive(int), default=16, help="output tokens per request (default 16)")
    p.add_argument("--budget-requests", type=_positive(float), default=2.5,
                   help="KV budget in whole requests (largest prompt + output, in 128-token blocks; default 2.5)")
    p.add_argument("--dtype", default="float32",
                   help="model dtype (default float32: CPUs without AVX-512 BF16 or AMX emulate bfloat16)")
    p.add_argument("--seed", type=int, default=5, help="workload seed (default 5)")
    return p


def parse_configs(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"--configs={text!r} is invalid: allowed distinct names from {', '.join(CONFIGS)}")
    return names


def budget_bytes(request_tokens: int, budget_requests: float, bytes_per_token: int) -> int:
    """``budget_requests`` whole requests of ``request_tokens``, in 128-token blocks."""
    blocks = -(-request_tokens // ROUND_TOKENS)
    return -(-int(budget_requests * blocks * 1000) // 1000) * ROUND_TOKENS * bytes_per_token


def run_config(model_dir: str, policy: str | None, workload: list, args, budget: int, max_model_len: int) -> dict:
    """One engine: warm up, send every request at once, step until done, shut down."""
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    from .overhead import step_recorder

    extra = {"enable_prefix_caching": False} if policy is None else {"additional_config": {"kv_policy": policy}}
    steps: list = []
    engine = LLMEngine.from_engine_args(
        EngineArgs(model_dir, dtype=args.dtype, max_model_len=max_model_len, kv_cache_memory_bytes=budget,
                   enforce_eager=True, seed=0, disable_log_stats=False, **extra),
        stat_loggers=[step_recorder(steps)])
    try:
        engine.add_request("warm-up", "Hello", SamplingParams(temperature=0, max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
        steps.clear()
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, min_tokens=args.max_tokens,
                                ignore_eos=True)
        before = registry_metrics()
        outputs = {}
        start = time.perf_counter()
        for req in workload:
            engine.add_request(str(req.index), req.text, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[int(out.request_id)] = out.outputs[0]
        wall = time.perf_counter() - start
        delta = metrics_delta(before, registry_metrics())
        state = engine.collective_rpc("adaptive_kv_state")[0] if policy else None
        block_size = engine.vllm_config.cache_config.block_size
    finally:
        engine.engine_core.shutdown()
        del engine
        gc.collect()
    running = [s[0] for s in steps]
    kept_count = delta.get("vllm_adaptive_kv:kept_fraction_count", 0)
    return {
        "policy": policy, "wall_s": wall, "block_size": block_size,
        "peak_running": max(running, default=0), "mean_running": sum(running) / len(running) if running else 0,
        "output_tokens_per_s": sum(len(o.token_ids) for o in outputs.values()) / wall,
        "accuracy": sum(req.passkey in outputs[req.index].text for req in workload) / len(workload),
        "kept_fraction": delta["vllm_adaptive_kv:kept_fraction_sum"] / kept_count if kept_count else None,
        "pages_freed": int(delta.get("vllm_adaptive_kv:evicted_tokens_total", 0)) // block_size if policy else None,
        "pool_empty": None if state is None else (state["free"] == state["num_pages"] and not state["live_requests"]),
    }


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _kept(r: dict) -> str:
    return "-" if r["kept_fraction"] is None else f"{100 * r['kept_fraction']:.1f}%"


def _pool(r: dict) -> str:
    return {None: "-", True: "yes", False: "NO"}[r["pool_empty"]]


def report(rows: dict[str, dict]) -> str:
    head = (f"{'':8} {'peak running':>12} {'mean running':>12} {'output tok/s':>12} {'wall':>7} {'passkey':>7} "
            f"{'KV kept':>7} {'pages freed':>11} {'pool empty':>10}")
    lines = [head]
    for name, r in rows.items():
        lines.append(
            f"{name:>8} {r['peak_running']:12d} {r['mean_running']:12.2f} {r['output_tokens_per_s']:12.2f} "
            f"{r['wall_s']:6.1f}s {100 * r['accuracy']:6.1f}% "
            f"{_kept(r):>7} {_cell(r['pages_freed'], ',d'):>11} {_pool(r):>10}")
    base, other = rows.get("vanilla"), rows.get("fastgen")
    if base and other:
        lines.append(f"fastgen / vanilla: {other['peak_running'] / base['peak_running']:.2f}x peak running, "
                     f"{other['mean_running'] / base['mean_running']:.2f}x mean running, "
                     f"{other['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x output tokens/s, "
                     f"passkey {100 * (other['accuracy'] - base['accuracy']):+.1f} points")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        parser.error(str(e))
    from ..model import prepare_model
    from .bench import build_workload, tokenizer_fns, workload_summary
    from .bench_suite import kv_bytes_per_token

    started = time.perf_counter()
    model_dir = str(prepare_model("smollm2", install=True))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    workload = build_workload(args.requests, args.prompt_tokens, (args.max_tokens, args.max_tokens), args.seed,
                              None, *tokenizer_fns(model_dir))
    per_token = kv_bytes_per_token(json.loads((Path(model_dir) / "config.json").read_text()), args.dtype)
    longest = max(r.prompt_tokens for r in workload) + args.max_tokens
    budget = budget_bytes(longest, args.budget_requests, per_token)
    # vLLM refuses a budget that cannot hold one max_model_len sequence; the longest request is enough
    max_model_len = -(-longest // ROUND_TOKENS) * ROUND_TOKENS
    rows = {name: run_config(model_dir, CONFIGS[name], workload, args, budget, max_model_len) for name in configs}
    w = workload_summary(workload, None, args.seed)
    print(f"\n{w['requests']} passkey requests at once (prompts {w['prompt_tokens']['min']}-{w['prompt_tokens']['max']} "
          f"tokens, {args.max_tokens} output tokens each), {args.dtype}, embedded SmolLM2-135M; KV budget "
          f"{budget / 2**20:.1f} MiB = {budget // per_token:,} tokens of every layer and KV head, "
          f"{args.budget_requests:g} whole requests")
    print("running: requests in each engine step's batch; KV kept: at each request's end, against the full cache; "
          f"pages hold {rows[configs[-1]]['block_size']} tokens of one (layer, KV head)\n")
    print(report(rows))
    print(f"\n({time.perf_counter() - started:.0f} s in all, engine start-ups included)")
    return 0 if all(r["pool_empty"] is not False for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
