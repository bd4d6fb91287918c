"""Concurrency at a fixed KV budget: fastgen against vanilla vLLM, one workload, one run.

The workload is the bench's memory-bound shape (``vllm-adaptive-kv bench``
defaults) in float32: a 128 MiB KV budget (about 2,900 tokens of the embedded model,
what the bench's 64 MiB holds in bfloat16, which CPUs without AVX-512 BF16 emulate)
and 8 passkey prompts of 1,250-1,350 tokens, all at once, 16 output tokens each.
Vanilla fits two whole prompts at a time; fastgen's compressed prompts leave room
for a third:

    budget  |######## prompt A ########|######## prompt B ########|###|   vanilla: 2
    budget  |### A' ###|### B' ###|### C' ###|#### D being prefilled ...   fastgen: 3+

Peak running is read from every engine step, not from polled gauges: a stat
logger on the offline ``LLMEngine`` sees each step's ``SchedulerStats``, the same
numbers vLLM publishes as ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc``. Wall time is printed, never asserted (tests do not
depend on speed; ``vllm-adaptive-kv bench`` measures it). Vanilla
runs without prefix caching, as the plugin does (the passkey prompts share long
prefixes, so with it vanilla would measure block sharing, not eviction).
"""

from __future__ import annotations

import gc
import time

import pytest

# Timeout: both engines take ~1.6 min here; sized for a machine ~10x slower.
pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]

KV_BUDGET = 128 << 20  # float32
NUM_REQUESTS = 8  # float32 prefill runs ~250 tokens/s here: 8 prompts keep the test near 2 min
PROMPT_TOKENS = (1250, 1350)
OUTPUT_TOKENS = 16
SEED = 11  # not the bench's default seed: other keys, depths and lengths


def run_workload(model_dir, policy, workload):
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    from vllm_adaptive_kv.apps.overhead import step_recorder

    extra = ({"enable_prefix_caching": False} if policy is None
             else {"additional_config": {"kv_policy": policy}})
    steps: list = []
    engine = LLMEngine.from_engine_args(
        EngineArgs(str(model_dir), dtype="float32", max_model_len=2048, kv_cache_memory_bytes=KV_BUDGET,
                   enforce_eager=True, seed=0, disable_log_stats=False, **extra),
        stat_loggers=[step_recorder(steps)])
    try:
        params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, min_tokens=OUTPUT_TOKENS,
                                ignore_eos=True)
        engine.add_request("warm-up", "Hello", SamplingParams(temperature=0, max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
        steps.clear()
        texts = {}
        start = time.perf_counter()
        for req in workload:
            engine.add_request(str(req.index), req.text, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    texts[int(out.request_id)] = out.outputs[0]
        wall = time.perf_counter() - start
        state = engine.collective_rpc("adaptive_kv_state") if policy is not None else None
    finally:
        engine.engine_core.shutdown()
        del engine
        gc.collect()
    return {
        "wall_s": wall,
        "peak_running": max(s[0] for s in steps),
        "mean_running": sum(s[0] for s in steps) / len(steps),
        "peak_kv_usage": max(s[2] for s in steps),
        "accuracy": sum(req.passkey in texts[req.index].text for req in workload) / len(workload),
        "output_tokens": sum(len(o.token_ids) for o in texts.values()),
        "state": state,
    }


@pytest.fixture(scope="module")
def runs(smollm2_dir):
    from vllm_adaptive_kv.apps.bench import build_workload, tokenizer_fns

    workload = build_workload(NUM_REQUESTS, PROMPT_TOKENS, (OUTPUT_TOKENS, OUTPUT_TOKENS), SEED, None,
                              *tokenizer_fns(str(smollm2_dir)))
    configs = (("vanilla", None), ("fastgen", "fastgen"))
    result = {name: run_workload(smollm2_dir, policy, workload) for name, policy in configs}
    for name, r in result.items():
        print(f"{name}: wall {r['wall_s']:.1f} s, peak running {r['peak_running']}, mean running "
              f"{r['mean_running']:.2f}, peak KV usage {r['peak_kv_usage']:.2f}, passkey {r['accuracy']:.2f}")
    v, f = result["vanilla"], result["fastgen"]
    print(f"fastgen / vanilla: {v['wall_s'] / f['wall_s']:.2f}x output tokens/s, "
          f"{f['peak_running'] / v['peak_running']:.2f}x peak running")
    return result


def test_every_request_got_its_tokens(runs):
    for r in runs.values():
        assert r["output_tokens"] == NUM_REQUESTS * OUTPUT_TOKENS


def test_vanilla_is_memory_bound(runs):
    """The shape is the one the issue names: the budget holds at most two whole prompts."""
    assert runs["vanilla"]["peak_running"] <= 2 and runs["vanilla"]["peak_kv_usage"] > 0.8


def test_fastgen_runs_more_requests_at_once(runs):
    assert runs["fastgen"]["peak_running"] > runs["vanilla"]["peak_running"]
    assert runs["fastgen"]["mean_running"] > runs["vanilla"]["mean_running"]


def test_fastgen_passkey_within_five_points(runs):
    assert runs["fastgen"]["accuracy"] >= runs["vanilla"]["accuracy"] - 0.05


def test_fastgen_pool_is_empty_afterwards(runs):
    (state,) = runs["fastgen"]["state"]
    assert state["live_requests"] == [] and state["pages_in_use"] == 0
    assert state["free"] == state["num_pages"]
