#!/usr/bin/env python
"""Decode attention on the CPU: our scored C++ kernel against vLLM's kernel, same lists.

Both kernels attend one decode query per list over the same page lists of one pool:
vLLM's ``cpu_attention_with_kv_cache`` ("vec" ISA, what the native path runs for
unscored lists) and ``scored_decode_attention`` (what it runs for lists whose scores
grow: the same attention plus each slot's probability added to its score). The
ratio of their times is the price of scoring a list at decode, per KV token,
without the rest of an engine step around it.

    lists      N = R requests x H kv heads, each with G query heads (GQA group)
    lengths    every list holds --len slots, or with --ragged a length drawn
               uniformly from [len / 2, 3 len / 2]
    pages      scattered: a random permutation of the pool, as after compaction

The two outputs are compared first (they attend the same slots). Then the kernels
run alternately, --repeats times each, and the script prints the median time of
each, ns per KV token (one token of one list, its G heads together) and the ratio.
Speed is for this script and docs/performance.md only: no test depends on it.

``--score-rows W`` times ``score_rows`` instead (the prompt end's profiling scores:
each request's last W prompt tokens against its lists); vLLM has no counterpart, so
it prints the time alone. Run it under two builds (``PYTHONPATH=TREE``) to compare.

    python scripts/bench_cpu_attention.py --lists 24 --len 3300 --group 3
    python scripts/bench_cpu_attention.py --ragged --dtype float32
    python scripts/bench_cpu_attention.py --lists 36 --len 1300 --score-rows 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from vllm_adaptive_kv.cpu_kernels import HAS_CPU_KERNELS, score_rows, scored_decode_attention
from vllm_adaptive_kv.plugin.cpu.attention import VllmCpuPagedAttention

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build_lists(args) -> dict:
    """Pool, page tables and queries for N = requests x heads lists (see the docstring)."""
    gen = torch.Generator().manual_seed(args.seed)
    heads, group, dim, bs = args.heads, args.group, args.head_dim, args.block_size
    if args.lists % heads:
        raise SystemExit(f"--lists {args.lists} is not a multiple of --heads {heads}")
    reqs = args.lists // heads
    if args.ragged:
        lens = torch.randint(args.len // 2, args.len * 3 // 2 + 1, (reqs, heads), generator=gen)
    else:
        lens = torch.full((reqs, heads), args.len)
    width = int(-(-lens.max() // bs))
    pages_per_list = -(-lens // bs)
    num_pages = int(pages_per_list.sum()) + 16
    order = torch.randperm(num_pages, generator=gen).to(torch.int32)
    table = torch.zeros(reqs, heads, width, dtype=torch.int32)
    used = 0
    for r in range(reqs):
        for h in range(heads):
            n = int(pages_per_list[r, h])
            table[r, h, :n] = order[used:used + n]
            used += n
    dtype = DTYPES[args.dtype]
    kv_pages = torch.randn(num_pages, 2, bs, dim, generator=gen).to(dtype)
    q = torch.randn(reqs, heads * group, dim, generator=gen).to(dtype)
    return dict(q=q, lens=lens.to(torch.int32), table=table, kv_pages=kv_pages, reqs=reqs,
                slot_pos=torch.arange(bs, dtype=torch.int32).repeat(num_pages, 1),  # every slot visible
                slot_score=torch.zeros(num_pages, bs), q_pos=torch.full((reqs,), 1 << 30, dtype=torch.int32))


def vllm_runner(d: dict, args):
    """A closure running vLLM's kernel over every list (sequence s = h * R + i) into its output."""
    heads, group, dim = args.heads, args.group, args.head_dim
    reqs = d["reqs"]
    kernel = VllmCpuPagedAttention(group, dim, d["q"].dtype)
    query = d["q"].view(reqs, heads, group, dim).transpose(0, 1).contiguous().view(heads * reqs, group, dim)
    seq_lens = d["lens"].t().contiguous().view(-1)
    table = d["table"].transpose(0, 1).contiguous().view(heads * reqs, -1)
    starts = torch.arange(heads * reqs + 1, dtype=torch.int32)
    out = torch.empty_like(query)
    keys, values = d["kv_pages"][:, 0].unsqueeze(1), d["kv_pages"][:, 1].unsqueeze(1)

    def run():
        kernel(query, keys, values, out, starts, seq_lens, table, args.scale)
        return out.view(heads, reqs, group, dim).transpose(0, 1).reshape(reqs, heads * group, dim)
    return run


def scored_runner(d: dict, args):
    """A closure running ``scored_decode_attention`` over every list into its output."""
    reqs, heads = d["reqs"], args.heads
    token = torch.arange(reqs).repeat_interleave(heads)
    head = torch.arange(heads).repeat(reqs)
    out = torch.empty_like(d["q"])

    def run():
        scored_decode_attention(d["q"], token, token, head, d["table"], d["lens"], d["q_pos"], d["kv_pages"],
                                d["slot_pos"], out, d["slot_score"], args.scale)
        return out
    return run


def score_rows_runner(d: dict, args):
    """A closure scoring each request's last ``--score-rows`` tokens against its lists (every head)."""
    reqs, heads, window = d["reqs"], args.heads, args.score_rows
    gen = torch.Generator().manual_seed(args.seed + 1)
    q = torch.randn(reqs * window, heads * args.group, args.head_dim, generator=gen).to(d["q"].dtype)
    last = d["lens"].max(dim=1).values.long()  # each request's prompt end
    q_pos = (last.repeat_interleave(window) - window + torch.arange(window).repeat(reqs)).to(torch.int32)
    d["slot_pos"] = torch.arange(args.block_size, dtype=torch.int32).repeat(d["kv_pages"].shape[0], 1) * 0
    first = (torch.arange(reqs) * window).repeat_interleave(heads)
    count = torch.full((reqs * heads,), window)
    row, head = torch.arange(reqs).repeat_interleave(heads), torch.arange(heads).repeat(reqs)

    def run():
        score_rows(q, first, count, row, head, d["table"], d["lens"], q_pos, d["kv_pages"], d["slot_pos"],
                   d["slot_score"], args.scale)
    return run


def cpu_flags() -> str:
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    have = set(flags.split())
    return " ".join(f for f in wanted if f in have) or "none of " + ",".join(wanted)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lists", type=int, default=24, help="N lists = requests x --heads")
    p.add_argument("--heads", type=int, default=3, help="kv heads per request")
    p.add_argument("--group", type=int, default=3, help="query heads per kv head")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--len", type=int, default=3300, help="slots per list (mean with --ragged)")
    p.add_argument("--ragged", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-rows", type=int, default=0, metavar="W",
                   help="time score_rows over each request's last W tokens instead")
    p.add_argument("--out", default=None, metavar="JSON")
    args = p.parse_args(argv)
    if not HAS_CPU_KERNELS:
        raise SystemExit("vllm_adaptive_kv._C is not built (make setup builds it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.scale = args.head_dim ** -0.5
    d = build_lists(args)
    if args.score_rows:
        return time_score_rows(d, args)
    runs = {"vllm": vllm_runner(d, args), "scored": scored_runner(d, args)}
    ref, got = runs["vllm"]().float(), runs["scored"]().float()
    err = float((got - ref).norm() / ref.norm())
    tokens = int(d["lens"].sum())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "cpu_flags": cpu_flags(),
              "threads": torch.get_num_threads(), "kv_tokens": tokens, "rel_err": err,
              "median_ms": {k: v * 1e3 for k, v in median.items()},
              "ns_per_token": {k: v * 1e9 / tokens for k, v in median.items()},
              "scored_over_vllm": median["scored"] / median["vllm"]}
    print(f"cpu flags: {result['cpu_flags']}; threads {result['threads']}; {args.dtype}; {args.lists} lists "
          f"(G {args.group}, D {args.head_dim}, bs {args.block_size}), {tokens} KV tokens; output rel err {err:.1e}")
    for name in runs:
        print(f"  {name:7s} {median[name] * 1e3:8.2f} ms   {result['ns_per_token'][name]:6.2f} ns/token")
    print(f"  scored / vllm: {result['scored_over_vllm']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def time_score_rows(d: dict, args) -> int:
    run = score_rows_runner(d, args)
    run()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "cpu_flags": cpu_flags(),
              "threads": torch.get_num_threads(), "score_rows_median_ms": median * 1e3}
    mean_len = int(d["lens"].float().mean())
    print(f"cpu flags: {result['cpu_flags']}; threads {result['threads']}; {args.dtype}; score_rows of "
          f"{d['reqs']} requests x {args.score_rows} rows over {args.lists} lists (mean {mean_len} slots): "
          f"{median * 1e3:.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
