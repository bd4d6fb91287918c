"""`make demo`: an offline vLLM batch on the embedded model, full cache vs FastGen.

For each policy, one ``vllm.LLM`` engine (the plugin, ``additional_config``)
answers the same passkey prompts (1.0-1.6k tokens, keys at every depth) and
chat questions. Printed per policy: KV tokens held at the end of each request
(summed over layers and KV heads) against the full cache, head pages freed,
passkey accuracy, output tokens/s, and that every page was back in the pool.

The numbers come from the plugin's own metrics (``vllm_adaptive_kv:*``) and a
pool audit run inside the worker.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from .common import metrics_delta, registry_metrics, token_counter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-adaptive-kv demo", description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="full,fastgen", help="comma-separated kv policies (default: full,fastgen)")
    p.add_argument("--passkeys", type=int, default=20, help="passkey prompts (default 20)")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="KV budget in MiB (default 256)")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    return p


def run_policy(model_dir: str, policy: str, args) -> dict:
    from vllm import LLM, SamplingParams

    from .prompts import CHAT_QUESTIONS, chat_text, passkey_prompt

    llm = LLM(model_dir, dtype=args.dtype, max_model_len=2048, kv_cache_memory_bytes=args.kv_cache_mib << 20,
              enforce_eager=True, seed=0, disable_log_stats=False,
              additional_config={"kv_policy": policy})
    try:
        tok = llm.get_tokenizer()
        passkeys = [passkey_prompt(40 + (i * 7) % 25, depth=(i % 5) / 4, seed=900 + i) for i in range(args.passkeys)]
        texts = [chat_text(tok, p.text) for p in passkeys] + [chat_text(tok, q) for q in CHAT_QUESTIONS]
        prompt_tokens = sum(map(token_counter(tok), texts))
        before = registry_metrics()
        start = time.perf_counter()
        outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=False)
        elapsed = time.perf_counter() - start
        delta = metrics_delta(before, registry_metrics())
        (state,) = llm.collective_rpc("adaptive_kv_state")
        config = llm.llm_engine.vllm_config
        lists = config.model_config.get_num_layers(config.parallel_config) * config.model_config.get_num_kv_heads(
            config.parallel_config)
        return {
            "policy": policy,
            "kept_fraction": delta["vllm_adaptive_kv:kept_fraction_sum"] / delta["vllm_adaptive_kv:kept_fraction_count"],
            "evicted_slots": delta.get("vllm_adaptive_kv:evicted_tokens_total", 0),
            "block_size": config.cache_config.block_size,
            "full_slots": sum(lists * (len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1) for o in outs),
            "accuracy": sum(p.is_correct(o.outputs[0].text) for p, o in zip(passkeys, outs)) / len(passkeys),
            "tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
            "prompt_tokens": prompt_tokens, "requests": len(texts), "seconds": elapsed,
            "pool_free_after": state["free"] == state["num_pages"] and not state["live_requests"],
        }
    finally:
        del llm
        gc.collect()


def report(row: dict) -> str:
    held = row["kept_fraction"] * row["full_slots"]
    freed_pages = int(row["evicted_slots"]) // row["block_size"]
    return (f"{row['policy']:>8}  KV tokens held {held:>10,.0f} ({100 * row['kept_fraction']:5.1f}% of full)  "
            f"pages freed >= {freed_pages:>6,}  passkey {100 * row['accuracy']:5.1f}%  "
            f"{row['tokens_per_s']:6.2f} tok/s  pool empty after: {row['pool_free_after']}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..model import prepare_model

    model_dir = str(prepare_model("smollm2", install=True))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    rows = [run_policy(model_dir, p.strip(), args) for p in args.policies.split(",") if p.strip()]
    first = rows[0]
    print(f"\n{first['requests']} requests ({args.passkeys} passkey + chat), {first['prompt_tokens']:,} prompt tokens, "
          f"{args.max_tokens} output tokens each, {args.dtype}, KV budget {args.kv_cache_mib} MiB, embedded SmolLM2-135M")
    print("KV tokens are summed over 30 layers x 3 KV heads at each request's end; pages hold "
          f"{first['block_size']} tokens of one (layer, KV head).")
    for row in rows:
        print(report(row))
    return 0 if all(r["pool_free_after"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
