#!/usr/bin/env python
"""Decode split-K sweep: time ``paged_attention`` at every split count, to tune ``split_count``.

For each (batch, context, kept) at Llama-3-8B shapes (8 KV / 32 query heads, head_dim 128,
bf16, pages of 16), the kernel is timed with ``num_splits`` forced to each of
--splits (CUDA-event medians, ``triton.testing.do_bench``), next to the count the
wrapper's rule (``split_count``) picks. The table shows each shape's best count, the
rule's count, and the rule's time over the best time: the rule is good where that
ratio stays near 1.

    PYTHONPATH=. python scripts/split_sweep.py --out split_sweep.json     # CUDA GPU, about 1 min

Every forced count is also checked against the torch reference (bf16 tolerance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from scripts.bench_kernels import LLAMA3_8B, KernelBench, int_list, float_list  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int_list, default=[1, 4, 8, 16, 32, 64, 128])
    p.add_argument("--context", type=int_list, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--kept", type=float_list, default=[1.0, 0.5])
    p.add_argument("--splits", type=int_list, default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    p.add_argument("--warmup-ms", type=float, default=5.0)
    p.add_argument("--rep-ms", type=float, default=20.0)
    p.add_argument("--out", default=None)
    return p


def bench_args(args) -> argparse.Namespace:
    return argparse.Namespace(tiny=False, model=LLAMA3_8B, dtype="bfloat16", seed=0, max_gib=None,
                              warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)


def sweep_one(bench: KernelBench, batch: int, ctx: int, kept: float, splits: list[int]) -> dict:
    torch = bench.torch
    from vllm_adaptive_kv.triton_kernels import paged_attention, paged_attention_reference
    from vllm_adaptive_kv.triton_kernels.paged_attention import split_count

    m, dev = bench.m, bench.device
    lens = bench.head_lengths(batch, ctx, kept)
    kv, slot_pos, _, _, table = bench.pool_for(lens)
    q = bench.randn(batch, m.q_heads, m.head_dim)
    token_req = torch.arange(batch, dtype=torch.int32, device=dev)
    q_pos = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    args = (q, token_req, q_pos, table, lens.to(dev), kv, slot_pos, m.head_dim ** -0.5)
    ref = paged_attention_reference(*args)
    out = torch.empty_like(q)
    width = table.shape[2]
    times, errors = {}, {}
    for n in splits:
        if n > 1 and width // n < 1:
            continue
        out.fill_(float("nan"))
        paged_attention(*args, out=out, num_splits=n, impl="triton")
        bench.sync()
        errors[n] = bench.rel_err(out, ref)
        times[n] = bench.timed(lambda n=n: paged_attention(*args, out=out, num_splits=n, impl="triton"))
    rule = split_count(batch * m.kv_heads, width, m.group, m.head_dim, dev)
    best = min(times, key=times.get)
    rule_ms = times.get(rule)
    if rule_ms is None:  # the rule picked a count outside --splits
        rule_ms = bench.timed(lambda: paged_attention(*args, out=out, num_splits=rule, impl="triton"))
    del kv, slot_pos, table, q, ref, out
    bench.free()
    return {"batch": batch, "context": ctx, "kept": kept, "table_pages": width, "programs": batch * m.kv_heads,
            "ms": {str(k): v for k, v in times.items()}, "rel_err": {str(k): v for k, v in errors.items()},
            "best": best, "best_ms": times[best], "rule": rule, "rule_ms": rule_ms,
            "rule_over_best": rule_ms / times[best], "nosplit_over_best": times[1] / times[best]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("split_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    bench = KernelBench(bench_args(args))
    rows, failures = [], []
    print("| batch | context | kept | pages | best | best ms | rule | rule/best | nosplit/best |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kept in args.kept:
        for ctx in args.context:
            for batch in args.batch:
                r = sweep_one(bench, batch, ctx, kept, args.splits)
                failures += [f"{batch}x{ctx}x{kept} splits={k}: rel err {e:.2e}" for k, e in r["rel_err"].items()
                             if not e < 1e-2]
                rows.append(r)
                print(f"| {batch} | {ctx} | {kept} | {r['table_pages']} | {r['best']} | {r['best_ms']:.3f} | "
                      f"{r['rule']} | {r['rule_over_best']:.2f} | {r['nosplit_over_best']:.2f} |", flush=True)
    worst = max(rows, key=lambda r: r["rule_over_best"])
    print(f"rule/best: geometric mean {geomean([r['rule_over_best'] for r in rows]):.3f}, worst "
          f"{worst['rule_over_best']:.2f} at batch {worst['batch']} context {worst['context']} kept {worst['kept']}")
    print("failures: " + ("; ".join(failures) if failures else "none"))
    if args.out:
        doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "failures": failures}
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 1 if failures else 0


def geomean(values: list[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


if __name__ == "__main__":
    sys.exit(main())
