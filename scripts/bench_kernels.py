#!/usr/bin/env python
"""Benchmark the Triton kernels of the per-head page pool against dense torch baselines.

Families (each on one layer's lists, Llama-3-8B-like: 8 KV heads, 32 query heads,
head_dim 128, bf16, pages of 16 slots; a whole decode step of the model runs it once
per layer, 32 times):

  decode    paged_attention, one query per request, ragged per-head lengths
            (kept fraction f: each list keeps about f of the context, spread
            uniformly around f), split-K as the wrapper picks it (also without
            splits when it picks some); with score accumulation (FastGen's
            `frequent` statistics) in every list, and in about half of the lists
            (the per-list score mask). Baseline: torch SDPA on dense K/V holding the
            same number of tokens (every list at the mean kept length), query group
            folded so that one K/V head serves its 4 query heads.
  prefill   paged_attention over a prefill chunk at the end of an uncompressed
            context, in query tiles (each list read once per tile) and one token a
            program. Baseline: SDPA with a lower-right causal mask (GQA).
  stats     window_attention_colsum: the profiler's attention column sums of the
            last 64 prompt queries. Baseline: dense softmax(QK^T) summed over the
            window (materialized, fp32).
  compact   compact_slots on moves planned by paging.PagedHeadCache.plan_compaction
            from random keep masks (the real planner). Baseline: torch gather +
            scatter of the same slots (the kernel's torch reference).
  write     write_kv of one decode step. Baseline: torch index_put of the same rows.

Every shape is first checked: the Triton output against the kernel's torch reference
(‖out − ref‖ / ‖ref‖, outputs poisoned with NaN first), and the dense attention
baseline against the kernel on the same tokens (first requests only). Then each
variant is timed with triton.testing.do_bench (CUDA events, warm-up, median).
Achieved bandwidth counts the fewest bytes each variant must move (inputs read once,
outputs written once) over its median time, as a % of the peak measured in the same
run with a large device-to-device copy (bytes read + bytes written).

    python scripts/bench_kernels.py --out bench_kernels.json          # on a CUDA GPU
    python scripts/bench_kernels.py --tiny                            # CPU, interpreter, correctness only

``--tiny`` sets TRITON_INTERPRET=1 (before the kernels are imported), uses tiny
shapes on the CPU and times nothing: it checks that every code path of this script
runs and that the kernels agree with their references (decode forces 3 splits there,
since its tables are too short for the wrapper to split).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

FAMILIES = ("decode", "prefill", "stats", "compact", "write")


@dataclass(frozen=True)
class Model:
    kv_heads: int = 8
    q_heads: int = 32
    head_dim: int = 128
    layers: int = 32
    block_size: int = 16

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


LLAMA3_8B = Model()
TINY = Model(kv_heads=2, q_heads=8, head_dim=64, layers=2, block_size=16)


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed a comma-separated list of integers >= 1")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed a comma-separated list of numbers in (0, 1]")
    return values


def family_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed a comma-separated list of {', '.join(FAMILIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, correctness only")
    p.add_argument("--families", type=family_list, default=list(FAMILIES), help="subset of " + ",".join(FAMILIES))
    p.add_argument("--batch", type=int_list, default=None, help="decode/compact batch sizes (default 64,128,256)")
    p.add_argument("--context", type=int_list, default=None, help="context lengths (default 2048,8192,32768)")
    p.add_argument("--kept", type=float_list, default=None, help="kept fractions (default 0.3,0.5,1.0)")
    p.add_argument("--prefill-batch", type=int_list, default=None, help="prefill/stats requests (default 1,8)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk tokens (default 512)")
    p.add_argument("--window", type=int, default=None, help="profiling window queries (default 64)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip shapes whose tensors need more (default: 85%% of the GPU's memory)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def defaults(args) -> None:
    tiny = args.tiny
    args.model = TINY if tiny else LLAMA3_8B
    args.batch = args.batch or ([2] if tiny else [64, 128, 256])
    args.context = args.context or ([72] if tiny else [2048, 8192, 32768])
    args.kept = args.kept or ([0.5, 1.0] if tiny else [0.3, 0.5, 1.0])
    args.prefill_batch = args.prefill_batch or ([2] if tiny else [1, 8])
    args.chunk = args.chunk or (4 if tiny else 512)
    args.window = args.window or (4 if tiny else 64)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    defaults(args)
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; the timings need an NVIDIA GPU (use --tiny on CPU for the "
              "correctness-only smoke run)", file=sys.stderr)
        return 2
    from vllm_adaptive_kv.triton_kernels import HAS_TRITON

    if not HAS_TRITON:
        print("bench_kernels: triton is not importable", file=sys.stderr)
        return 2
    bench = KernelBench(args)
    return bench.run()


class KernelBench:
    """One run: peak bandwidth, then every selected family over its shapes."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.m = args.model
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = getattr(torch, args.dtype)
        self.esize = torch.empty((), dtype=self.dtype).element_size()
        self.gen = torch.Generator(device="cpu").manual_seed(args.seed)  # small host-side draws
        self.dgen = torch.Generator(device=self.device).manual_seed(args.seed + 1)  # big tensors, on device
        self.rows: list[dict] = []
        self.failures: list[str] = []
        if args.tiny:
            self.max_bytes = 1 << 30
        else:
            total = torch.cuda.get_device_properties(0).total_memory
            self.max_bytes = int((args.max_gib * 2**30) if args.max_gib else 0.85 * total)

    # ----------------------------------------------------------------- plumbing

    def timed(self, fn) -> float | None:
        """Median milliseconds of ``fn`` (None in --tiny mode: the interpreter's time means nothing)."""
        if self.args.tiny:
            fn()
            return None
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                             return_mode="median"))

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()  # surfaces asynchronous launch errors here

    def randn(self, *shape, dtype=None):
        return self.torch.randn(*shape, generator=self.dgen, device=self.device, dtype=dtype or self.dtype)

    def rel_err(self, out, ref) -> float:
        out, ref = out.double(), ref.double()
        if not bool(self.torch.isfinite(out).all()):
            return float("nan")
        return float((out - ref).norm() / ref.norm().clamp_min(1e-30))

    def check(self, name: str, err: float, tol: float) -> bool:
        ok = err == err and err <= tol  # NaN fails
        if not ok:
            self.failures.append(f"{name}: relative error {err:.3g} > {tol:g}")
        return ok

    def add(self, family: str, shape: dict, variant: str, ms: float | None, bytes_moved: int,
            kv_tokens: int | None = None, **extra) -> dict:
        row = {"family": family, **shape, "variant": variant, "ms": ms, "bytes": bytes_moved,
               "kv_tokens": kv_tokens,
               "gb_per_s": None if not ms else bytes_moved / ms / 1e6,
               "pct_peak": None if not ms or not self.peak_gbps else 100 * bytes_moved / ms / 1e6 / self.peak_gbps,
               "ns_per_kv_token": None if not ms or not kv_tokens else ms * 1e6 / kv_tokens, **extra}
        self.rows.append(row)
        return row

    def skip(self, family: str, shape: dict, need: int) -> bool:
        if need <= self.max_bytes:
            return False
        self.rows.append({"family": family, **shape, "variant": "skipped", "ms": None,
                          "note": f"needs ~{need / 2**30:.1f} GiB > {self.max_bytes / 2**30:.1f} GiB"})
        return True

    def free(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    # ----------------------------------------------------------------- pool construction

    def head_lengths(self, batch: int, ctx: int, kept: float):
        """[B, H] int32 list lengths around ``kept * ctx`` (uniform spread, mean ~kept)."""
        torch = self.torch
        spread = min(0.5, (1 - kept) / kept) if kept < 1 else 0.0
        frac = kept * (1 + spread * (2 * torch.rand(batch, self.m.kv_heads, generator=self.gen) - 1))
        return (frac * ctx).round().clamp(1, ctx).to(torch.int32)

    def pool_for(self, lens):
        """Pool with every list's pages drawn from a random permutation; slot positions = logical index.

        Returns (kv_pages, slot_pos, slot_flags, slot_score, page_table [B, H, W]).
        """
        torch = self.torch
        bs, dev = self.m.block_size, self.device
        pages = (lens.long() + bs - 1) // bs  # [B, H]
        width = int(pages.max())
        num_pages = int(pages.sum()) + 8  # a few pages no list owns
        flat = pages.reshape(-1)
        start = torch.cumsum(flat, 0) - flat
        col = torch.arange(width)
        owned = col[None, :] < flat[:, None]
        perm = torch.randperm(num_pages, generator=self.gen)
        table = torch.where(owned, perm[(start[:, None] + col[None, :]).clamp_max(num_pages - 1)], -1)
        table = table.to(torch.int32).reshape(*lens.shape, width)
        kv = self.randn(num_pages, 2, bs, self.m.head_dim)
        slot_pos = torch.zeros(num_pages, bs, dtype=torch.int32, device=dev)
        # slot_pos[page, off] = logical index i of the list slot that lives there
        logical = torch.arange(width * bs)
        valid = (logical[None, :] < lens.reshape(-1, 1).long())  # [M, S]
        phys_page = table.reshape(-1, width).long()[:, logical // bs]
        slot_ids = (phys_page * bs + logical % bs)[valid]
        slot_pos.view(-1)[slot_ids.to(dev)] = logical.expand_as(valid)[valid].to(torch.int32).to(dev)
        flags = torch.zeros(num_pages, bs, dtype=torch.uint8, device=dev)
        score = torch.zeros(num_pages, bs, dtype=torch.float32, device=dev)
        return kv, slot_pos, flags, score, table.to(dev)

    def pool_bytes(self, total_slots: int) -> int:
        return total_slots * (2 * self.m.head_dim * self.esize + 9)

    # ----------------------------------------------------------------- peak bandwidth

    def measure_peak(self) -> None:
        torch = self.torch
        size = (64 << 20) if self.args.tiny else (4 << 30)
        src = torch.empty(size, dtype=torch.uint8, device=self.device)
        src.random_(0, 255)
        dst = torch.empty_like(src)
        ms = self.timed(lambda: dst.copy_(src))
        self.sync()
        assert torch.equal(dst[:4096], src[:4096])
        self.peak_gbps = None if ms is None else 2 * size / ms / 1e6
        self.peak = {"copy_bytes": size, "ms": ms, "gb_per_s": self.peak_gbps}
        del src, dst
        self.free()

    # ----------------------------------------------------------------- decode

    def decode_shapes(self):
        for b in self.args.batch:
            for ctx in self.args.context:
                for kept in self.args.kept:
                    yield b, ctx, kept

    def run_decode(self) -> None:
        for batch, ctx, kept in self.decode_shapes():
            shape = {"batch": batch, "context": ctx, "kept": kept}
            mean_len = kept * ctx
            # the pool is freed before the dense baseline allocates the same amount again
            need = int(1.3 * self.pool_bytes(int(batch * self.m.kv_heads * mean_len)))
            if self.skip("decode", shape, need):
                continue
            kv_tokens, dense_err = self.decode_one(batch, ctx, kept, shape)
            self.free()  # the pool is gone (decode_one returned) before the dense K/V is allocated
            length = max(1, round(kv_tokens / (batch * self.m.kv_heads)))
            self.decode_dense(batch, length, shape, self.m.head_dim ** -0.5, dense_err)
            self.free()

    def decode_one(self, batch, ctx, kept, shape) -> tuple[int, float]:
        torch = self.torch
        from vllm_adaptive_kv.triton_kernels import paged_attention, paged_attention_reference
        from vllm_adaptive_kv.triton_kernels.paged_attention import split_count

        m, dev = self.m, self.device
        lens = self.head_lengths(batch, ctx, kept)
        kv, slot_pos, _, score, table = self.pool_for(lens)
        head_lens = lens.to(dev)
        q = self.randn(batch, m.q_heads, m.head_dim)
        token_req = torch.arange(batch, dtype=torch.int32, device=dev)
        q_pos = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        scale = m.head_dim ** -0.5
        args = (q, token_req, q_pos, table, head_lens, kv, slot_pos, scale)
        # --tiny tables are too short for the wrapper to split: force split-K there
        forced = 3 if self.args.tiny else None
        splits = forced or split_count(batch * m.kv_heads, table.shape[2], m.group, m.head_dim, dev)
        attend = dict(num_splits=forced, impl="triton")
        # FastGen-like: about half of the lists read scores while decoding
        half = torch.rand(batch, m.kv_heads, generator=self.gen) < 0.5
        half[0, 0], half[-1, -1] = True, False
        half = half.to(dev)

        out = torch.full_like(q, float("nan"))
        paged_attention(*args, out=out, **attend)
        self.sync()
        ref = paged_attention_reference(*args)
        err = self.rel_err(out, ref)
        tol = 1e-2 if self.esize == 2 else 1e-4
        ok = self.check(f"decode {shape}", err, tol)
        no_split_err = err
        if splits > 1:
            paged_attention(*args, out=out, num_splits=1, impl="triton")
            no_split_err = self.rel_err(out, ref)
            ok &= self.check(f"decode without splits {shape}", no_split_err, tol)
        score_errs = []
        for name, mask in (("decode+score", None), ("decode+score half the lists", half)):
            start = score.clone()
            score_ref = score.clone()
            paged_attention(*args, out=out, slot_score=score, score_lists=mask, **attend)
            paged_attention_reference(*args, slot_score=score_ref, score_lists=mask)
            self.sync()
            score_errs.append(self.rel_err(score - start, score_ref - start))
            ok &= self.check(f"{name} {shape}", score_errs[-1], 5e-3)
            del start, score_ref
        dense_err = self.decode_dense_check(q, kv, table, lens, out, scale)
        ok &= self.check(f"decode dense baseline {shape}", dense_err, tol)
        del ref

        kv_tokens = int(lens.long().sum())
        held_slots = int(((lens.long() + m.block_size - 1) // m.block_size).sum()) * m.block_size
        qo = 2 * q.numel() * self.esize
        ours_bytes = held_slots * (2 * m.head_dim * self.esize + 4) + qo + 4 * held_slots // m.block_size
        ms = self.timed(lambda: paged_attention(*args, out=out, **attend))
        self.add("decode", shape, "paged", ms, ours_bytes, kv_tokens, rel_err=err, ok=ok, splits=splits,
                 note=f"split-K: {splits} splits" + (" (forced)" if forced else "") if splits > 1 else "")
        if splits > 1:
            ms_one = self.timed(lambda: paged_attention(*args, out=out, num_splits=1, impl="triton"))
            self.add("decode", shape, "paged-nosplit", ms_one, ours_bytes, kv_tokens, rel_err=no_split_err,
                     ok=ok, splits=1)
        ms_score = self.timed(lambda: paged_attention(*args, out=out, slot_score=score, **attend))
        # the score pass re-reads K and positions and adds into each slot's score
        per_slot = m.head_dim * self.esize + 4 + 8
        score_bytes = ours_bytes + held_slots * per_slot
        self.add("decode", shape, "paged+score", ms_score, score_bytes, kv_tokens, rel_err=score_errs[0], ok=ok,
                 splits=splits)
        ms_half = self.timed(lambda: paged_attention(*args, out=out, slot_score=score, score_lists=half, **attend))
        pages = (lens.long() + m.block_size - 1) // m.block_size
        half_slots = int(pages[half.cpu()].sum()) * m.block_size
        self.add("decode", shape, "paged+score-half-lists", ms_half, ours_bytes + half_slots * per_slot,
                 kv_tokens, rel_err=score_errs[1], ok=ok, splits=splits,
                 note="score_lists: about half the lists score")
        return kv_tokens, dense_err

    def decode_dense_check(self, q, kv, table, lens, out, scale) -> float:
        """SDPA on the first requests' lists gathered densely (padded + masked) vs the kernel."""
        torch = self.torch
        import torch.nn.functional as F

        m = self.m
        rows = min(2, q.shape[0])
        width = table.shape[2]
        logical = torch.arange(width * m.block_size, device=self.device)
        page = table[:rows].long()[..., logical // m.block_size].clamp_min(0)  # [r, H, S]
        keys = kv[page, 0, logical % m.block_size]  # [r, H, S, D]
        values = kv[page, 1, logical % m.block_size]
        visible = logical < lens[:rows].to(self.device)[..., None]  # [r, H, S]
        qg = q[:rows].view(rows, m.kv_heads, m.group, m.head_dim)
        dense = F.scaled_dot_product_attention(qg, keys, values, attn_mask=visible[:, :, None, :], scale=scale)
        return self.rel_err(out[:rows].view_as(dense), dense)

    def decode_dense(self, batch, length, shape, scale, check_err) -> None:
        """SDPA over dense K/V with the same number of KV tokens; the query group is folded
        into the query-length axis, so each K/V head is read once for its G query heads."""
        import torch.nn.functional as F

        m = self.m
        qg = self.randn(batch, m.kv_heads, m.group, m.head_dim)
        k = self.randn(batch, m.kv_heads, length, m.head_dim)
        v = self.randn(batch, m.kv_heads, length, m.head_dim)
        F.scaled_dot_product_attention(qg, k, v, scale=scale)
        self.sync()
        ms = self.timed(lambda: F.scaled_dot_product_attention(qg, k, v, scale=scale))
        tokens = batch * m.kv_heads * length
        self.add("decode", shape, "dense-sdpa", ms, 2 * tokens * m.head_dim * self.esize
                 + 2 * qg.numel() * self.esize, tokens, dense_length=length, rel_err=check_err,
                 note=f"every list at {length} tokens; rel err: gathered lists vs the kernel")
        del qg, k, v

    # ----------------------------------------------------------------- prefill

    def run_prefill(self) -> None:
        for batch in self.args.prefill_batch:
            for ctx in self.args.context:
                chunk = min(self.args.chunk, ctx)
                shape = {"batch": batch, "context": ctx, "kept": 1.0, "chunk": chunk}
                need = int(2.3 * self.pool_bytes(batch * self.m.kv_heads * ctx))  # pool + gathered K/V
                if self.skip("prefill", shape, need):
                    continue
                self.prefill_one(batch, ctx, chunk, shape)
                self.free()

    def prefill_one(self, batch, ctx, chunk, shape) -> None:
        """A chunk of ``chunk`` query tokens per request at the end of an uncompressed context."""
        torch = self.torch
        from vllm_adaptive_kv.triton_kernels import paged_attention, paged_attention_reference
        from vllm_adaptive_kv.triton_kernels.paged_attention import default_tile_tokens, make_query_tiles

        m, dev = self.m, self.device
        lens = torch.full((batch, m.kv_heads), ctx, dtype=torch.int32)
        kv, slot_pos, _, _, table = self.pool_for(lens)
        head_lens = lens.to(dev)
        tokens = batch * chunk
        q = self.randn(tokens, m.q_heads, m.head_dim)
        token_req = torch.arange(batch, dtype=torch.int32, device=dev).repeat_interleave(chunk)
        q_pos = (ctx - chunk + torch.arange(chunk, dtype=torch.int32, device=dev)).repeat(batch)
        scale = m.head_dim ** -0.5
        args = (q, token_req, q_pos, table, head_lens, kv, slot_pos, scale)
        tile_tokens = min(default_tile_tokens(m.group), 2 if self.args.tiny else chunk)
        tiled = dict(query_tiles=make_query_tiles([chunk] * batch, tile_tokens, device=dev),
                     tile_tokens=tile_tokens, impl="triton")
        out = torch.full_like(q, float("nan"))
        ref = paged_attention_reference(*args)
        tol = 1e-2 if self.esize == 2 else 1e-4
        paged_attention(*args, out=out, impl="triton")
        self.sync()
        token_err = self.rel_err(out, ref)
        ok = self.check(f"prefill one token a program {shape}", token_err, tol)
        out.fill_(float("nan"))
        paged_attention(*args, out=out, **tiled)
        self.sync()
        err = self.rel_err(out, ref)
        ok &= self.check(f"prefill {shape}", err, tol)
        del ref
        # dense baseline over exactly these tokens: the lists gathered in logical order
        page = table.long()[..., torch.arange(ctx, device=dev) // m.block_size]
        off = torch.arange(ctx, device=dev) % m.block_size
        k, v = kv[page, 0, off].contiguous(), kv[page, 1, off].contiguous()  # [B, H, ctx, D]
        qd = q.view(batch, chunk, m.q_heads, m.head_dim).transpose(1, 2).contiguous()  # [B, Hq, C, D]
        dense_fn, variant = self.prefill_dense_fn(qd, k, v, scale)
        dense = dense_fn()
        dense_err = self.rel_err(out.view(batch, chunk, m.q_heads, m.head_dim).transpose(1, 2), dense)
        ok &= self.check(f"prefill dense baseline {shape}", dense_err, 1e-2 if self.esize == 2 else 1e-4)
        del dense
        kv_tokens = batch * m.kv_heads * ctx
        qo = 2 * q.numel() * self.esize
        paged_bytes = kv_tokens * (2 * m.head_dim * self.esize + 4) + qo
        ms = self.timed(lambda: paged_attention(*args, out=out, **tiled))
        self.add("prefill", shape, "paged", ms, paged_bytes, kv_tokens, rel_err=err, ok=ok, tile_tokens=tile_tokens,
                 note=f"query tiles of {tile_tokens} tokens")
        ms_token = self.timed(lambda: paged_attention(*args, out=out, impl="triton"))
        self.add("prefill", shape, "paged-per-token", ms_token, paged_bytes, kv_tokens, rel_err=token_err, ok=ok,
                 note="one query token a program: each list re-read per token")
        ms_dense = self.timed(dense_fn)
        self.add("prefill", shape, variant, ms_dense, kv_tokens * 2 * m.head_dim * self.esize + qo, kv_tokens,
                 rel_err=dense_err)

    def prefill_dense_fn(self, q, k, v, scale):
        """SDPA with a lower-right causal mask and GQA; falls back to an explicit boolean mask
        (and then to K/V expanded per query head) where a backend refuses the combination."""
        import torch.nn.functional as F
        from torch.nn.attention.bias import causal_lower_right

        chunk, ctx = q.shape[2], k.shape[2]
        bias = causal_lower_right(chunk, ctx)
        mask = self.torch.ones(chunk, ctx, dtype=self.torch.bool, device=self.device).tril(ctx - chunk)
        group = q.shape[1] // k.shape[1]
        attempts = (
            ("dense-sdpa-causal-gqa", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                                                             enable_gqa=True)),
            ("dense-sdpa-mask-gqa", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                           enable_gqa=True)),
        )
        for name, fn in attempts:
            try:
                fn()
                self.sync()
                return fn, name
            except (RuntimeError, TypeError, NotImplementedError):
                continue
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return (lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask, scale=scale)), "dense-sdpa-expanded"

    # ----------------------------------------------------------------- profiling statistics

    def run_stats(self) -> None:
        for batch in self.args.prefill_batch:
            for ctx in self.args.context:
                window = min(self.args.window, ctx)
                shape = {"batch": batch, "context": ctx, "kept": 1.0, "window": window}
                dense_bytes = 3 * 4 * batch * self.m.q_heads * window * ctx  # logits, probs, temp (fp32)
                need = 2 * self.pool_bytes(batch * self.m.kv_heads * ctx) + dense_bytes
                if self.skip("stats", shape, need):
                    continue
                self.stats_one(batch, ctx, window, shape)
                self.free()

    def stats_one(self, batch, ctx, window, shape) -> None:
        torch = self.torch
        from vllm_adaptive_kv.triton_kernels import window_attention_colsum, window_attention_colsum_reference

        m, dev = self.m, self.device
        lens = torch.full((batch, m.kv_heads), ctx, dtype=torch.int32)
        kv, slot_pos, _, _, table = self.pool_for(lens)
        head_lens = lens.to(dev)
        q = self.randn(batch * window, m.q_heads, m.head_dim)
        token_req = torch.arange(batch, dtype=torch.int32, device=dev).repeat_interleave(window)
        q_pos = (ctx - window + torch.arange(window, dtype=torch.int32, device=dev)).repeat(batch)
        scale = m.head_dim ** -0.5
        args = (q, token_req, q_pos, table, head_lens, kv, slot_pos, scale)
        out = torch.full((batch, m.kv_heads, table.shape[2] * m.block_size), float("nan"), device=dev)
        window_attention_colsum(*args, out=out, impl="triton")
        self.sync()
        err = self.rel_err(out, window_attention_colsum_reference(*args))
        ok = self.check(f"stats {shape}", err, 5e-3)
        page = table.long()[..., torch.arange(ctx, device=dev) // m.block_size]
        off = torch.arange(ctx, device=dev) % m.block_size
        k = kv[page, 0, off].contiguous()  # [B, H, ctx, D]
        qd = q.view(batch, window, m.kv_heads, m.group, m.head_dim).permute(0, 2, 3, 1, 4).reshape(
            batch, m.kv_heads, m.group * window, m.head_dim)
        mask = torch.ones(window, ctx, dtype=torch.bool, device=dev).tril(ctx - window).repeat(m.group, 1)

        def dense_fn(precise=False):
            # timed in the pool dtype (what a dense implementation would run); checked in fp32,
            # since bf16 logits alone shift the probabilities by ~1e-3
            a, b = (qd.float(), k.float()) if precise else (qd, k)
            logits = torch.matmul(a, b.transpose(-1, -2)).float() * scale
            return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).sum(2)

        dense_err = self.rel_err(out[..., :ctx], dense_fn(precise=True))
        ok &= self.check(f"stats dense baseline {shape}", dense_err, 5e-3)
        kv_tokens = batch * m.kv_heads * ctx
        out_bytes = 4 * out.numel()
        ms = self.timed(lambda: window_attention_colsum(*args, out=out, impl="triton"))
        self.add("stats", shape, "paged", ms, kv_tokens * (m.head_dim * self.esize + 4) + q.numel() * self.esize
                 + out_bytes, kv_tokens, rel_err=err, ok=ok)
        ms_dense = self.timed(dense_fn)
        self.add("stats", shape, "dense-matmul-softmax", ms_dense, kv_tokens * m.head_dim * self.esize
                 + q.numel() * self.esize + 4 * kv_tokens, kv_tokens, rel_err=dense_err)

    # ----------------------------------------------------------------- compaction

    def run_compact(self) -> None:
        for batch, ctx, kept in self.decode_shapes():
            if kept >= 1.0:
                continue  # nothing moves
            shape = {"batch": batch, "context": ctx, "kept": kept}
            need = int(2.2 * self.pool_bytes(batch * self.m.kv_heads * ctx)) + 40 * batch * self.m.kv_heads * ctx
            if self.skip("compact", shape, need):
                continue
            self.compact_one(batch, ctx, kept, shape)
            self.free()

    def compact_one(self, batch, ctx, kept, shape) -> None:
        """Lists of the full context (a prompt just profiled) keep ~``kept`` of their slots at random."""
        torch = self.torch
        from vllm_adaptive_kv.core.paging import PagedHeadCache
        from vllm_adaptive_kv.triton_kernels import compact_slots, compact_slots_reference

        m, dev = self.m, self.device
        lens = torch.full((batch, m.kv_heads), ctx, dtype=torch.int32)
        kv, slot_pos, flags, score, table = self.pool_for(lens)
        flags.random_(0, 4)
        score.uniform_()
        cache = PagedHeadCache(kv.shape[0], m.block_size, 1, m.kv_heads, table.shape[2], batch, device=dev)
        cache.table.copy_(table[:, None])
        cache.lens.copy_(lens[:, None].to(dev))
        prob = self.head_lengths(batch, ctx, kept).float() / ctx  # ragged keep probability per list
        keep = torch.rand(batch, 1, m.kv_heads, ctx, generator=self.gen) < prob[:, None, :, None]
        keep = keep.to(dev)
        rows = torch.arange(batch, device=dev)
        plan = cache.plan_compaction(rows, keep)
        moves_args = (plan.src_slot, plan.dst_slot, plan.num_moves)
        before = [t.clone() for t in (kv, slot_pos, flags, score)]
        compact_slots(kv, slot_pos, flags, score, *moves_args, impl="triton")
        self.sync()
        compact_slots_reference(*before, *moves_args)
        ok = all(torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                             b.view(torch.uint8) if b.is_floating_point() else b)
                 for a, b in zip((kv, slot_pos, flags, score), before))
        if not ok:
            self.failures.append(f"compact {shape}: the Triton pool differs from the reference pool")
        pool = before  # the reference's pool: the baseline runs in place on it
        moves = int(plan.num_moves.long().sum())
        move_bytes = moves * 2 * (2 * m.head_dim * self.esize + 9) + 16 * moves
        ms = self.timed(lambda: compact_slots(kv, slot_pos, flags, score, *moves_args, impl="triton"))
        self.add("compact", shape, "triton", ms, move_bytes, moves, ok=ok, moves=moves,
                 kept_slots=int(plan.new_lens.long().sum()))
        ms_ref = self.timed(lambda: compact_slots_reference(*pool, *moves_args))
        self.add("compact", shape, "torch-gather-scatter", ms_ref, move_bytes, moves, moves=moves)
        ms_plan = self.timed(lambda: cache.plan_compaction(rows, keep))
        self.add("compact", shape, "plan (paging.py)", ms_plan, keep.numel() + 16 * keep.numel(), None)

    # ----------------------------------------------------------------- write_kv

    def run_write(self) -> None:
        for batch in self.args.batch:
            shape = {"batch": batch, "context": self.args.context[0], "kept": 1.0}
            self.write_one(batch, shape)
            self.free()

    def write_one(self, batch, shape) -> None:
        """One decode step: a new token per request written into every list of one layer."""
        torch = self.torch
        from vllm_adaptive_kv.triton_kernels import write_kv, write_kv_reference

        m, dev = self.m, self.device
        lens = torch.full((batch, m.kv_heads), m.block_size * 4, dtype=torch.int32)
        kv, slot_pos, flags, score, table = self.pool_for(lens)
        key = self.randn(batch, m.kv_heads, m.head_dim)
        value = self.randn(batch, m.kv_heads, m.head_dim)
        perm = torch.randperm(kv.shape[0] * m.block_size, generator=self.gen)[: batch * m.kv_heads]
        slots = perm.view(batch, m.kv_heads).to(dev)
        positions = torch.arange(batch, dtype=torch.int32, device=dev)
        tok_flags = torch.ones(batch, dtype=torch.uint8, device=dev)
        pool = (kv, slot_pos, flags, score)
        ref_pool = [t.clone() for t in pool]
        write_kv(key, value, slots, positions, tok_flags, *pool, impl="triton")
        self.sync()
        write_kv_reference(key, value, slots, positions, tok_flags, *ref_pool)
        ok = all(torch.equal(a, b) for a, b in zip(pool, ref_pool))
        if not ok:
            self.failures.append(f"write {shape}: the Triton pool differs from the reference pool")
        rows = batch * m.kv_heads
        bytes_moved = rows * (2 * 2 * m.head_dim * self.esize + 8 + 9) + 5 * batch
        ms = self.timed(lambda: write_kv(key, value, slots, positions, tok_flags, *pool, impl="triton"))
        self.add("write", shape, "triton", ms, bytes_moved, rows, ok=ok)
        page, off = slots.reshape(-1) // m.block_size, slots.reshape(-1) % m.block_size
        kv_new = torch.stack((key.reshape(-1, m.head_dim), value.reshape(-1, m.head_dim)), 1)

        def dense():
            kv[page, :, off] = kv_new

        ms_ref = self.timed(dense)
        self.add("write", shape, "torch-index-put", ms_ref, rows * 2 * 2 * m.head_dim * self.esize, rows)

    # ----------------------------------------------------------------- report

    def run(self) -> int:
        started = time.perf_counter()
        self.measure_peak()
        for family in self.args.families:
            getattr(self, f"run_{family}")()
        doc = {"schema": "vllm-adaptive-kv-bench-kernels/1", "tiny": self.args.tiny, **environment(self.torch),
               "model": self.m.__dict__ | {"name": "tiny" if self.args.tiny else "llama-3-8b-like"},
               "dtype": self.args.dtype, "peak_copy": self.peak, "rows": self.rows, "failures": self.failures,
               "seconds": time.perf_counter() - started}
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(doc, indent=1))
        print(report(doc))
        return 1 if self.failures else 0


def environment(torch) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    root = Path(__file__).resolve().parent.parent
    try:
        env["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def report(doc: dict) -> str:
    """Markdown tables, one per family; the dense baseline beside each paged variant."""
    lines = [f"device: {doc['device']}; torch {doc['torch']}, triton {doc['triton']}, commit {doc['commit']}; "
             f"{doc['dtype']}"]
    peak = doc["peak_copy"]
    lines.append(f"peak copy bandwidth: {_cell(peak['gb_per_s'], '.0f')} GB/s "
                 f"({peak['copy_bytes'] / 2**30:.2f} GiB device copy, read + write)")
    if doc["tiny"]:
        lines.append("--tiny: correctness only (Triton interpreter on CPU); no timings")
    keys = ("batch", "context", "kept", "chunk", "window")
    for family in FAMILIES:
        rows = [r for r in doc["rows"] if r["family"] == family]
        if not rows:
            continue
        lines += ["", f"### {family}", "",
                  "| batch | context | kept | variant | ms | GB/s | % peak | ns / KV token | rel err | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            shape = " | ".join(str(r.get(k, "")) for k in keys[:3])
            extra = ", ".join(f"{k} {r[k]}" for k in keys[3:] if k in r)
            note = r.get("note") or extra
            lines.append(f"| {shape} | {r['variant']} | {_cell(r.get('ms'), '.3f')} | "
                         f"{_cell(r.get('gb_per_s'), '.0f')} | {_cell(r.get('pct_peak'), '.0f')} | "
                         f"{_cell(r.get('ns_per_kv_token'), '.3f')} | {_cell(r.get('rel_err'), '.1e')} | {note} |")
    lines.append("")
    lines.append("failures: " + ("; ".join(doc["failures"]) if doc["failures"] else "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
