"""Steady-decode step time of several engine configurations, side by side, and profiles.

One child process per configuration holds an in-process vLLM engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in the child, so one
``engine.step()`` is one whole engine step and nothing runs between calls). Every
child gets the same workload (N passkey prompts of about P tokens, all at once,
outputs long enough never to finish during the run) and runs its prefill. Then the
parent takes the children in turn, a few decode steps each, for several rounds:
machine noise (2 shared cores) falls on every configuration alike, and the ratios
are of step times measured in the same rounds.

    python scripts/decode_profile.py --configs vanilla32,full,fastgen --running 32 \
        --prompt-tokens 1024 --rounds 6 --steps 8
    python scripts/decode_profile.py --configs fastgen --py-spy fastgen=/tmp/fastgen.txt
    python scripts/decode_profile.py --configs fastgen --torch-profile fastgen

Configurations: ``vanilla`` (vLLM at its defaults), ``vanilla32`` (block size 32, the
plugin's), and any plugin policy name (``full``, ``fastgen``, ...). Plugin engines run
the native CPU attention path unless ``VLLM_ADAPTIVE_KV_CPU_ATTENTION`` says otherwise.
``NAME@TREE`` runs a configuration with the package of another source tree (e.g. an
older commit unpacked by ``git archive COMMIT | tar -x -C TREE``), for before/after
ratios measured in one run.

``--py-spy NAME=FILE`` samples that child (Python frames, 100 Hz) during an extra
round of ``--profile-steps`` decode steps and writes py-spy's collapsed stacks to
FILE; the script prints the top functions (inclusive share of the sampled time).
``--torch-profile NAME`` prints torch.profiler's op table for such a round and splits its
step into attention (vLLM's and our kernels) and the rest. When the first configuration
and a compressed one are both profiled, it prints the steady-decode reading: the bar
(kept x the first's step + 10%), the attention ratio against the pages kept, and the
attention share of the step the bar needs if the rest of the step does not shrink.
Speed is for this script and the docs only: no test depends on it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

PLUGIN_BLOCK_SIZE = 32


def child_main(conn, spec: str, args_dict: dict, texts: list[str]) -> None:
    """An in-process engine for configuration ``spec``, driven by commands on ``conn``.

    ``NAME@TREE`` runs NAME with the vllm_adaptive_kv of source tree TREE (first on
    sys.path, ahead of the editable install): two commits side by side in one run.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    name, _, tree = spec.partition("@")
    if tree:
        sys.path.insert(0, tree)
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    args = argparse.Namespace(**args_dict)
    extra = {}
    if name == "vanilla32":
        extra["block_size"] = PLUGIN_BLOCK_SIZE
    if not name.startswith("vanilla"):
        extra["additional_config"] = {"kv_policy": name}
    engine = LLMEngine.from_engine_args(EngineArgs(
        args.model, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_memory_bytes=args.budget,
        max_num_seqs=args.max_num_seqs or args.running, max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=True,
        seed=0, enable_prefix_caching=False, **extra))
    params = SamplingParams(temperature=0, max_tokens=args.output_tokens, min_tokens=args.output_tokens,
                            ignore_eos=True)
    for i, text in enumerate(texts):
        engine.add_request(str(i), text, params)
    produced: dict[str, int] = {}

    def step() -> tuple[float, float]:
        """(wall, CPU) seconds of one engine step (CPU: all threads of this process)."""
        start, cpu = time.perf_counter(), time.process_time()
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
        return time.perf_counter() - start, time.process_time() - cpu

    prefill_start = time.perf_counter()
    while len(produced) < len(texts) or min(produced.values()) < 1:
        step()
    for _ in range(2):  # every request decoding
        step()
    conn.send({"ready": True, "prefill_s": time.perf_counter() - prefill_start, "pid": os.getpid()})
    while True:
        cmd, count = conn.recv()
        if cmd == "stop":
            break
        if cmd == "steps":
            times = [step() for _ in range(count)]
            conn.send({"times": times, "min_tokens": min(produced.values()),
                       "running": engine.get_num_unfinished_requests()})
        elif cmd == "torch":
            import torch.profiler as tp

            with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
                times = [step() for _ in range(count)]
            averages = prof.key_averages()
            conn.send({"table": averages.table(sort_by="self_cpu_time_total", row_limit=30), "times": times,
                       "self_ms": {e.key: e.self_cpu_time_total / 1000 for e in averages}})
        elif cmd == "state":
            try:
                conn.send({"state": engine.collective_rpc("adaptive_kv_state")[0]})
            except Exception as err:  # vanilla engines have no such method
                conn.send({"state": None, "error": repr(err)})


def frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else func


def top_functions(collapsed: Path, root: str = "LLMEngine.step", limit: int = 30) -> list[tuple[str, float, float]]:
    """(function, inclusive %, self %) of py-spy collapsed stacks, as shares of the samples
    inside ``root`` (one engine step), top ``limit`` by inclusive share.

    Frames present in nearly every step sample (the call chain down to the model) are
    left out, and a custom op's ``OpOverloadPacket.__call__`` is named after its caller
    (``torch.ops <- caller``), so each kernel shows apart.
    """
    inclusive, own, total = Counter(), Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame_name(f) for f in stack.split(";")]
        if not any(f.startswith(root + " ") for f in frames):
            continue
        for i, f in enumerate(frames):
            if f.startswith("OpOverloadPacket.__call__") and i:
                frames[i] = "torch.ops <- " + frames[i - 1]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    if not total:
        return []
    rows = [(f, 100 * c / total, 100 * own[f] / total) for f, c in inclusive.most_common()
            if c < 0.97 * total]
    return rows[:limit]


# The ops that attend over the KV: vLLM's CPU kernel and our scored one (one call per layer
# each). Their self time is the step's attention; everything else does not shrink with the KV.
ATTENTION_OPS = ("_C::cpu_attention_with_kv_cache", "adaptive_kv::scored_decode_attention")


def attention_split(self_ms: dict[str, float], step_wall_s: list[float]) -> dict[str, float]:
    """A torch.profiler round's step split: mean step wall ms, attention ms per step and its share.

    ``self_ms``: op name -> self CPU ms over the round (``key_averages``); ``step_wall_s``: the
    round's step wall times. The profiler's overhead falls on the many small ops, so the
    share it gives attention is, if anything, low.
    """
    steps = len(step_wall_s)
    step_ms = 1000 * sum(step_wall_s) / steps
    attention_ms = sum(self_ms.get(op, 0.0) for op in ATTENTION_OPS) / steps
    return {"step_ms": step_ms, "attention_ms": attention_ms, "attention_share": attention_ms / step_ms}


def steady_decode_reading(kept: float, base_step_ms: float, step_ms: float, base_split: dict,
                          split: dict, margin: float = 0.10) -> dict[str, float]:
    """Issue 14's steady-decode bar (step <= kept x the base's step + margin) beside what bounds it.

    If attention shrank exactly with the KV kept and the rest of the step stayed as the
    base's, the step would be ``(1 - a) + a * kept`` of the base's (a: the base's attention
    share); that meets the bar only when ``a >= (1 - (1 + margin) * kept) / (1 - kept)``.
    ``attention_ratio`` (this config's attention ms over the base's, against ``kept``) says
    whether attention itself shrank with the KV.
    """
    if not 0 < kept < 1:
        raise ValueError(f"kept={kept} must be in (0, 1)")
    share, bar_ms = base_split["attention_share"], (1 + margin) * kept * base_step_ms
    return {"kept": kept, "bar_ms": bar_ms, "step_ms": step_ms, "over_bar": step_ms / bar_ms,
            "attention_ratio": split["attention_ms"] / base_split["attention_ms"],
            "base_attention_share": share, "share_needed": (1 - (1 + margin) * kept) / (1 - kept),
            "step_if_attention_scaled": (1 - share) + share * kept}


def kv_bytes_per_token(model_dir: str, dtype: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * (4 if dtype == "float32" else 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="vanilla32,full,fastgen")
    p.add_argument("--running", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=8, help="decode steps per child per round")
    p.add_argument("--profile-steps", type=int, default=24)
    p.add_argument("--py-spy", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--torch-profile", action="append", default=[], metavar="NAME")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=None, help="(default: --running; a server's is vLLM's default)")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=None, metavar="JSON")
    return p


def print_steady_decode(doc: dict, base: str, splits: dict) -> None:
    """The steady-decode reading of every profiled config against the profiled base (first config)."""
    base_row = doc["configs"][base]
    base_pages = (base_row.get("state") or {}).get("pages_in_use")
    if base not in splits or not base_pages:
        return
    for name, split in splits.items():
        row = doc["configs"][name]
        pages = (row.get("state") or {}).get("pages_in_use")
        if name == base or not pages or pages >= base_pages:
            continue
        reading = row["steady_decode"] = steady_decode_reading(pages / base_pages, base_row["median_ms"],
                                                               row["median_ms"], splits[base], split)
        print(f"\nsteady decode, {name} against {base}: pages kept {reading['kept']:.3f}; attention "
              f"{reading['attention_ratio']:.3f}x {base}'s; step {reading['step_ms']:.1f} ms against the bar "
              f"{reading['bar_ms']:.1f} ms ({reading['over_bar']:.2f}x); {base}'s attention share "
              f"{100 * reading['base_attention_share']:.1f}%, the bar needs >= {100 * reading['share_needed']:.1f}% "
              f"(with the rest of the step unchanged, attention scaled by the KV kept gives "
              f"{reading['step_if_attention_scaled']:.3f}x {base}'s step)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vllm_adaptive_kv.apps.bench import build_workload, tokenizer_fns
    from vllm_adaptive_kv.apps.common import git_commit, machine_info
    from vllm_adaptive_kv.model import prepare_model

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.model = args.model or str(prepare_model("smollm2"))
    profiled = sum(1 for _ in args.py_spy) + len(args.torch_profile)
    args.output_tokens = args.rounds * args.steps + profiled * args.profile_steps + 64
    workload = build_workload(args.running, (args.prompt_tokens, args.prompt_tokens),
                              (args.output_tokens, args.output_tokens), 0, None, *tokenizer_fns(args.model))
    longest = max(r.prompt_tokens for r in workload)
    if longest + args.output_tokens > args.max_model_len:
        raise SystemExit(f"prompt {longest} + output {args.output_tokens} tokens exceed --max-model-len")
    args.budget = (args.running * (longest + args.output_tokens + 64) + 4096) * kv_bytes_per_token(
        args.model, args.dtype)
    texts = [r.text for r in workload]
    ctx = mp.get_context("spawn")
    children = {}
    for name in configs:  # one at a time: engine starts compete for the 2 cores
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=child_main, args=(child, name, vars(args), texts), daemon=True)
        proc.start()
        child.close()  # the child holds its end: if it dies, recv() here raises EOFError
        info = parent.recv()
        print(f"[decode_profile] {name}: ready (prefill {info['prefill_s']:.1f} s, pid {info['pid']})", flush=True)
        children[name] = (proc, parent, info)
    times = {name: [] for name in configs}  # (wall, cpu) per step
    for rnd in range(args.rounds):
        for name in configs:
            _, conn, _ = children[name]
            conn.send(("steps", args.steps))
            reply = conn.recv()
            times[name] += reply["times"]
        print(f"[decode_profile] round {rnd + 1}/{args.rounds} (wall / CPU ms, median): "
              + ", ".join(f"{n} {1000 * statistics.median(w for w, _ in times[n][-args.steps:]):.1f} / "
                          f"{1000 * statistics.median(c for _, c in times[n][-args.steps:]):.1f}" for n in configs),
              flush=True)
    doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_commit(), "machine": machine_info(),
           "args": {k: v for k, v in vars(args).items()}, "configs": {}}
    base = configs[0]
    for name in configs:
        wall, cpu = [w for w, _ in times[name]], [c for _, c in times[name]]
        doc["configs"][name] = {"median_ms": 1000 * statistics.median(wall), "mean_ms": 1000 * statistics.fmean(wall),
                                "cpu_median_ms": 1000 * statistics.median(cpu), "cpu_mean_ms": 1000 * statistics.fmean(cpu),
                                "steps": len(wall), "prefill_s": children[name][2]["prefill_s"],
                                "wall_ms": [1000 * w for w in wall], "cpu_ms": [1000 * c for c in cpu]}
        children[name][1].send(("state", 0))
        doc["configs"][name]["state"] = children[name][1].recv().get("state")
    print(f"\n{args.running} requests, prompts of ~{args.prompt_tokens} tokens, {args.rounds} rounds x "
          f"{args.steps} decode steps per configuration")
    print(f"| config | wall median ms | wall mean ms | CPU median ms | CPU mean ms | wall / {base} | "
          f"CPU / {base} | pages in use |")
    print("|---|---|---|---|---|---|---|---|")
    ref = doc["configs"][base]
    for name in configs:
        row = doc["configs"][name]
        state = row["state"] or {}
        print(f"| {name} | {row['median_ms']:.1f} | {row['mean_ms']:.1f} | {row['cpu_median_ms']:.1f} | "
              f"{row['cpu_mean_ms']:.1f} | {row['median_ms'] / ref['median_ms']:.3f} | "
              f"{row['cpu_median_ms'] / ref['cpu_median_ms']:.3f} | {state.get('pages_in_use', '-')} |")
    for spec in args.py_spy:
        name, _, path = spec.partition("=")
        _, conn, info = children[name]
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(info["pid"]),
                                "--rate", "100", "--format", "raw", "-o", path],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # attach
        conn.send(("steps", args.profile_steps))
        reply = conn.recv()
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        print(f"\npy-spy, {name}: {args.profile_steps} decode steps, median "
              f"{1000 * statistics.median(w for w, _ in reply['times']):.1f} ms wall ({path})")
        print("| function (file) | inclusive % | self % |\n|---|---|---|")
        for func, inc, own in top_functions(Path(path)):
            print(f"| {func} | {inc:.1f} | {own:.1f} |")
    splits = {}
    for name in args.torch_profile:
        _, conn, _ = children[name]
        conn.send(("torch", args.profile_steps))
        reply = conn.recv()
        splits[name] = attention_split(reply["self_ms"], [w for w, _ in reply["times"]])
        doc["configs"][name]["profile"] = splits[name]
        print(f"\ntorch.profiler, {name}: {args.profile_steps} decode steps; attention "
              f"{splits[name]['attention_ms']:.1f} ms of a {splits[name]['step_ms']:.1f} ms step "
              f"({100 * splits[name]['attention_share']:.1f}%)\n{reply['table']}")
    print_steady_decode(doc, base, splits)
    for proc, conn, _ in children.values():
        conn.send(("stop", 0))
        proc.join(timeout=60)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
