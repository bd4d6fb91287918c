#!/usr/bin/env python
"""One offline vLLM engine on the second model (qwen2.5-coder-0.5b), vanilla or with the plugin.

usage: tp_probe.py MODE TP [DTYPE] [OUT.json]
  MODE   vanilla | full | fastgen | any other kv_policy (engine default policy)
  TP     tensor_parallel_size (1 or 2)
  DTYPE  float32 (default) | bfloat16

Runs one greedy chat ("What is the capital of France?"), then 5 chat prompts and 4
passkey prompts (1.0k-2.5k tokens) in one batch, and prints (and writes to OUT) the
texts, token ids, passkey hits, timings and, with the plugin, the pool state of every
rank (``collective_rpc("adaptive_kv_state")``), the last two requests' per-rank head
policies and the plugin's Prometheus counters.

The model must be prepared first (this script installs nothing):
``vllm-adaptive-kv model prepare qwen2.5-coder-0.5b``.

On a one-NUMA-node CPU machine TP=2 needs one CPU list per rank, e.g.
``VLLM_CPU_OMP_THREADS_BIND='0|1' python scripts/tp_probe.py full 2`` (see
docs/integration.md, "Tensor parallelism and the second model").
"""

from __future__ import annotations

import gc
import json
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    mode, tp = argv[0], int(argv[1])
    dtype = argv[2] if len(argv) > 2 else "float32"
    out_path = argv[3] if len(argv) > 3 else None

    from vllm import LLM, SamplingParams

    from vllm_adaptive_kv.apps.common import registry_metrics
    from vllm_adaptive_kv.model import prepare_model
    from vllm_adaptive_kv.apps.prompts import CHAT_QUESTIONS, chat_text, passkey_prompt

    model = prepare_model("qwen2.5-coder-0.5b")
    extra = {} if mode == "vanilla" else {"additional_config": {"kv_policy": mode}, "block_size": 32}
    if tp > 1:
        extra.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    t0 = time.monotonic()
    llm = LLM(str(model), dtype=dtype, max_model_len=4096, kv_cache_memory_bytes=256 << 20, enforce_eager=True,
              seed=0, max_num_batched_tokens=512, disable_log_stats=False, **extra)
    start_s = time.monotonic() - t0
    tok = llm.get_tokenizer()
    t1 = time.monotonic()
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    chat_s = time.monotonic() - t1
    questions = CHAT_QUESTIONS[:4] + ("Write a Python function that returns the n-th Fibonacci number.",)
    passkeys = [passkey_prompt(n, depth=d, seed=900 + i)
                for i, (n, d) in enumerate([(40, 0.25), (60, 0.5), (80, 0.75), (100, 0.5)])]
    texts = [chat_text(tok, q) for q in questions] + [chat_text(tok, p.text) for p in passkeys]
    t2 = time.monotonic()
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    gen_s = time.monotonic() - t2
    res = {
        "mode": mode, "tp": tp, "dtype": dtype,
        "start_s": round(start_s, 1), "chat_s": round(chat_s, 1), "gen_s": round(gen_s, 1),
        "chat": chat[0].outputs[0].text, "chat_finish": chat[0].outputs[0].finish_reason,
        "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "passkey": [p.is_correct(o.outputs[0].text) for p, o in zip(passkeys, outs[len(questions):])],
    }
    if mode != "vanilla":
        res["state"] = llm.collective_rpc("adaptive_kv_state")
        res["head_policies_per_rank"] = [dict(list(p.items())[-2:]) for p in llm.collective_rpc("adaptive_kv_head_policies")]
        res["metrics"] = registry_metrics(by_labels=("policy", "le"))
    text = json.dumps(res, indent=1)
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
    del llm
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
