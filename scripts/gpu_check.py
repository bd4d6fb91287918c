#!/usr/bin/env python
"""End-to-end GPU check without vLLM: HeadCacheRuntime inside a transformers Llama, plus kernel timings.

Needs only torch, triton and transformers (no vLLM, no tokenizer, no download). A
seeded, random, SmolLM2-shaped ``LlamaForCausalLM`` (30 layers, hidden 576, 9 query /
3 KV heads of 64, vocab 49152, rope theta 1e5, tied embeddings) is built in memory and
attends through ``transformers.AttentionInterface`` into ``HeadCacheRuntime.attend``.
An engine loop batches like vLLM: every step flattens the scheduled requests' tokens
(prefill chunks under a token budget, mixed with one-token decodes) into one ``[1, T]``
input with per-token ``position_ids``::

    meta = rt.plan_step(...); model(ids, position_ids) -> rt.attend per layer;
    rt.finish_step(meta); sample (greedy) or teacher-force; rt.release(finished)

Checks (fp32; each passes or fails, the JSON says by how much):

  full_vs_dense_fp32        policy ``full`` (Triton path) against the dense HF model
                            (sdpa, one teacher-forced forward per request): max |dlogit|
                            at every generated position, greedy tokens equal (a
                            mismatch is tolerated only at a near-tie of the dense logits)
  triton_vs_torch_<policy>  fastgen (recovery_ratio 0.7, so random weights compress),
                            h2o, snapkv: the Triton path against the torch path on the
                            same device, the torch run teacher-forced with the Triton
                            run's tokens: logits, ``rt.choice``, list lengths and kept slot
                            positions of every list, at the prompt's end and at the end.
                            The two paths sum the same scores in a different order, so a
                            list whose kept sets differ by one or two slots whose scores
                            agree within --swap-tol is a tolerated boundary swap (counted
                            and shown); the fp32 logit tolerance is then judged on the
                            requests no swap touched
  pool_audit                ``cache.audit()`` clean after every step of every run, and
                            every page free after the last release
  kernel_checks             the kernel benchmark's own checks at Llama-3-8B shapes
                            (Triton against its torch reference and the dense baseline)

Informative (no pass/fail): ``full_vs_dense_bf16`` (the same as the first check in
bf16) and per-step wall time of each run, Triton against torch.

Timing (``scripts/bench_kernels.py``'s KernelBench, reused): paged_attention decode
(with and without score accumulation) and prefill, write_kv and compaction against
dense baselines over the same tokens (torch SDPA; xformers where installed), at
Llama-3-8B shapes (32 query / 8 KV heads, head_dim 128, bf16), CUDA-event medians
after warm-up, with achieved bandwidth (bytes of K/V moved / time). The profiling
kernel (window_stats) is not timed: the runtime does not call it.

    PYTHONPATH=. python scripts/gpu_check.py                 # CUDA GPU, about 2-3 min on an H100/H200
    PYTHONPATH=. python scripts/gpu_check.py --quick         # smaller workload and timing sweep
    python scripts/gpu_check.py --dry-run                    # CPU, Triton interpreter, tiny shapes (CI)

One JSON (``--out``; default ``$OUT/gpu_check.json`` when OUT is set, else
``./gpu_check.json``) and a short summary on stdout; the exit code is 1 when a
correctness check failed, 2 when the run cannot start (no CUDA without --dry-run), 3 when
nothing failed but the time budget cut the run short (``--time-budget``, 240 s by default on a
GPU; the JSON is rewritten after every check, so a killed run still leaves what it did).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "vllm-adaptive-kv-gpu-check/1"
POLICIES = {  # the compared policies; fastgen at a low recovery ratio, so random weights compress
    "fastgen": {"recovery_ratio": 0.7},
    "h2o": {"budget_ratio": 0.5},
    "snapkv": {"budget_ratio": 0.5},
}


@dataclass(frozen=True)
class Shape:
    """Model, workload and timing sweep of one mode."""

    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    vocab: int = 49152
    block_size: int = 16
    prompts: tuple[int, ...] = (40, 300, 700, 1200)
    new_tokens: int = 32
    budget: int = 256  # tokens per engine step
    observation_window: int = 64
    snapkv_window: int = 32
    bf16: bool = True  # also the informative bf16 run
    # timing sweep (scripts/bench_kernels.py arguments)
    bench: tuple[str, ...] = ("--batch", "8,64", "--context", "2048,8192", "--kept", "0.5,1.0",
                              "--prefill-batch", "1,4", "--chunk", "512", "--warmup-ms", "10", "--rep-ms", "40")


FULL = Shape()
QUICK = Shape(prompts=(40, 300, 700), new_tokens=20, bf16=False,
              bench=("--batch", "64", "--context", "4096", "--kept", "0.5,1.0", "--prefill-batch", "1",
                     "--chunk", "512", "--warmup-ms", "10", "--rep-ms", "30"))
DRY = Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=512, block_size=16,
            prompts=(4, 20), new_tokens=17, budget=16, observation_window=16, snapkv_window=4, bf16=False,
            bench=("--tiny", "--batch", "2", "--context", "40", "--kept", "0.5", "--prefill-batch", "1",
                   "--chunk", "4"))
BENCH_FAMILIES = "decode,prefill,compact,write"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--dry-run", "--cpu", dest="dry_run", action="store_true",
                   help="CPU + TRITON_INTERPRET=1 with tiny shapes (what CI runs); timings mean nothing")
    p.add_argument("--quick", action="store_true", help="smaller GPU workload and timing sweep, no bf16 run")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qk-gain", type=float, default=4.0,
                   help="scale of the random q/k projections (peaked attention, so scores rarely tie)")
    p.add_argument("--logit-tol", type=float, default=2e-3, help="fp32 max |dlogit| allowed (default 2e-3)")
    p.add_argument("--swap-tol", type=float, default=1e-2,
                   help="largest score gap, relative to the list's largest score, at which the Triton and torch "
                        "runs may keep different slots at a keep/evict boundary (default 1e-2)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which the remaining checks and timing families are skipped and the run "
                        "reported incomplete (default 240 on a GPU, none with --dry-run)")
    p.add_argument("--skip-timing", action="store_true", help="checks only")
    p.add_argument("--skip-checks", action="store_true", help="timing only")
    return p


def default_out() -> str:
    out = os.environ.get("OUT")
    return str(Path(out) / "gpu_check.json") if out else "gpu_check.json"


# --------------------------------------------------------------------------- the model


class Bridge:
    """The runtime and step the registered attention function reads (set per forward)."""

    runtime = None
    meta = None


def adaptive_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: q [1, Hq, T, D], k / v [1, H, T, D] -> ([1, T, Hq, D], None).

    Custom implementations get no mask: causality and the per-request lists come
    from the step's metadata.
    """
    import torch

    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    out = torch.empty_like(q)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    Bridge.runtime.attend(module.layer_idx, q, k, v, out, Bridge.meta, scale)
    return out[None], None


def build_model(shape: Shape, seed: int, qk_gain: float, device, dtype):
    import torch
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    AttentionInterface.register("adaptive_kv", adaptive_attention)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, rope_theta=1e5,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)  # CPU init: the same weights on every machine
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_gain)
            layer.self_attn.k_proj.weight.mul_(qk_gain)
    return model.to(device=device, dtype=dtype).eval()


def set_attention(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):
        model.config._attn_implementation = name


def token_flags(vocab: int):
    """Synthetic token classes (no tokenizer there): ids 0-2 special, id % 23 == 5 punctuation."""
    import torch
    from vllm_adaptive_kv.core.layout import FLAG_PUNCT, FLAG_SPECIAL

    flags = torch.zeros(vocab, dtype=torch.uint8)
    ids = torch.arange(vocab)
    flags[(ids % 23 == 5) & (ids > 2)] = FLAG_PUNCT
    flags[:3] = FLAG_SPECIAL
    return flags


def make_prompts(shape: Shape, seed: int) -> list[list[int]]:
    """BOS, random ids, an end-of-turn special token at a random place."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    prompts = []
    for n in shape.prompts:
        ids = torch.randint(3, shape.vocab, (n,), generator=gen)
        ids[0] = 1
        if n > 2:
            ids[int(torch.randint(1, n, (1,), generator=gen))] = 2
        prompts.append(ids.tolist())
    return prompts


# --------------------------------------------------------------------------- engine loop


@dataclass
class Request:
    rid: str
    prompt: list[int]
    new_tokens: int
    fed: int = 0  # tokens run through the model
    out: list[int] = field(default_factory=list)
    logits: list = field(default_factory=list)  # [V] fp32 (CPU) per generated token

    @property
    def done(self) -> bool:
        return len(self.out) >= self.new_tokens

    def next_tokens(self, n: int) -> list[int]:
        seq = self.prompt + self.out
        return seq[self.fed:self.fed + n]


@dataclass
class RunResult:
    tokens: dict  # rid -> generated ids
    logits: dict  # rid -> [G, V] fp32 CPU
    snaps: dict  # rid -> {"prompt_end": snap, "final": snap}
    steps: int
    mixed_steps: int  # steps holding both prefill chunks and decodes
    step_ms: list
    audit_failures: list
    pages_in_use_after: int
    evicted_tokens: int
    head_policy_counts: dict
    slots_kept_fraction: float  # slots held at the end / tokens written, over all requests' lists
    wall_s: float


def snapshot(rt, rid: str) -> dict:
    """choice [L, H], lens [L, H], kept slot positions [L, H, S] (-1 past the end) and their
    accumulated scores [L, H, S] (nan past the end) of one request."""
    import torch

    row = rt.rows[rid]
    lens = rt.cache.lens[row].long()
    pages = rt.cache.table[row].long().clamp_min(0)  # [L, H, W]
    pos = rt.pool.slot_pos[pages].reshape(*lens.shape, -1).long()  # [L, H, W * bs]
    logical = torch.arange(pos.shape[-1], device=pos.device)
    held = logical < lens[..., None]
    kept = torch.where(held, pos, torch.full_like(pos, -1))
    score = rt.pool.slot_score[pages].reshape(*lens.shape, -1).float()
    score = torch.where(held, score, torch.full_like(score, float("nan")))
    return {"choice": rt.choice[row].cpu(), "lens": lens.cpu(), "kept": kept.cpu(), "score": score.cpu()}


def run_engine(model, shape: Shape, prompts, policy: str, settings: dict, impl: str, device, dtype, flags,
               forced: dict | None = None) -> RunResult:
    """Serve every prompt through HeadCacheRuntime; greedy unless ``forced`` gives the tokens."""
    import torch
    from vllm_adaptive_kv.core.attention import attention_path
    from vllm_adaptive_kv.core.layout import KVPool
    from vllm_adaptive_kv.core.runtime import HeadCacheRuntime

    bs, L, H = shape.block_size, shape.layers, shape.kv_heads
    longest = max(len(p) for p in prompts) + shape.new_tokens
    pages = sum(L * H * (-(-(len(p) + shape.new_tokens) // bs) + 1) for p in prompts) + 64
    pool = KVPool.allocate(pages, bs, shape.head_dim, dtype, device)
    window = {"observation_window": shape.observation_window}
    if policy == "snapkv":
        window["window"] = shape.snapkv_window
    rt = HeadCacheRuntime(pool, L, H, shape.heads // H, max_reqs=len(prompts), max_model_len=longest,
                          token_flags=flags, default_settings={"kv_policy": policy, **settings, **window},
                          attention=attention_path(impl))
    set_attention(model, "adaptive_kv")
    Bridge.runtime = rt
    reqs = [Request(f"r{i}", p, shape.new_tokens) for i, p in enumerate(prompts)]
    snaps = {r.rid: {} for r in reqs}
    active = list(reqs)
    step_ms, audit_failures, evicted, counts, mixed = [], [], 0, {}, 0
    written = kept = 0
    started = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    while active:
        budget, sched = shape.budget, []
        for r in active:  # running requests in order: a decode takes 1 token, a prefill a chunk
            if budget == 0:
                break
            n = min(len(r.prompt) - r.fed, budget) if r.fed < len(r.prompt) else 1
            sched.append((r, n))
            budget -= n
        kinds = {r.fed < len(r.prompt) for r, _ in sched}  # True: a prefill chunk, False: a decode
        mixed += len(kinds) == 2
        for r, _ in sched:
            if r.rid not in rt.rows:
                rt.add(r.rid, len(r.prompt))
        ids = [t for r, n in sched for t in r.next_tokens(n)]
        pos = [p for r, n in sched for p in range(r.fed, r.fed + n)]
        sample_at, sampling, t = [], [], 0
        for r, n in sched:
            t += n
            if r.fed + n >= len(r.prompt):
                sample_at.append(t - 1)
                sampling.append(r)
        sync()
        t0 = time.perf_counter()
        ids_t = torch.tensor(ids, dtype=torch.int64, device=device)
        pos_t = torch.tensor(pos, dtype=torch.int64, device=device)
        meta = rt.plan_step([r.rid for r, _ in sched], [n for _, n in sched], pos_t, ids_t)
        Bridge.meta = meta
        with torch.no_grad():
            logits = model(input_ids=ids_t[None], position_ids=pos_t[None], use_cache=False,
                           logits_to_keep=torch.tensor(sample_at, dtype=torch.int64, device=device)).logits[0].float()
        report = rt.finish_step(meta)
        sync()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        evicted += report.evicted_tokens
        for name, c in report.head_policy_counts.items():
            counts[name] = counts.get(name, 0) + c
        for r, n in sched:
            r.fed += n
        for r, row in zip(sampling, logits):
            tok = forced[r.rid][len(r.out)] if forced is not None else int(row.argmax())
            r.out.append(tok)
            r.logits.append(row.cpu())
        for r, _ in sched:
            if r.fed >= len(r.prompt) and "prompt_end" not in snaps[r.rid]:
                snaps[r.rid]["prompt_end"] = snapshot(rt, r.rid)
        try:
            rt.cache.audit()
        except AssertionError as err:
            audit_failures.append(f"step {len(step_ms)}: {err}")
        finished = [r for r, _ in sched if r.done]
        for r in finished:
            snaps[r.rid]["final"] = snapshot(rt, r.rid)
            rep = report.requests[r.rid]
            written += rep.tokens * L * H
            kept += rep.slots_held
        rt.release([r.rid for r in finished])
        active = [r for r in active if not r.done]
    try:
        rt.cache.audit()
    except AssertionError as err:
        audit_failures.append(f"after release: {err}")
    Bridge.runtime = Bridge.meta = None
    return RunResult(tokens={r.rid: r.out for r in reqs}, logits={r.rid: torch.stack(r.logits) for r in reqs},
                     snaps=snaps, steps=len(step_ms), mixed_steps=mixed, step_ms=step_ms,
                     audit_failures=audit_failures,
                     pages_in_use_after=rt.pages_in_use(), evicted_tokens=evicted, head_policy_counts=counts,
                     slots_kept_fraction=kept / max(written, 1), wall_s=time.perf_counter() - started)


def dense_logits(model, prompt: list[int], out: list[int], device):
    """The dense model's logits at every generated position (one teacher-forced forward)."""
    import torch

    set_attention(model, "sdpa")
    seq = torch.tensor(prompt + out[:-1], dtype=torch.int64, device=device)
    with torch.no_grad():
        logits = model(input_ids=seq[None], use_cache=False).logits[0].float()
    return logits[len(prompt) - 1:].cpu()


# --------------------------------------------------------------------------- comparisons


def logit_compare(ref: dict, got: dict, tokens: dict) -> dict:
    """max |dlogit| over every request and position; greedy agreement of ``ref`` with ``tokens``.

    A token that differs from ref's argmax counts as a near-tie when ref's logit of
    the token is within 2 x max |dlogit| (+1e-6) of ref's max: the two runs' rounding
    alone can pick either one.
    """
    import torch

    max_abs = max(float((ref[rid] - got[rid]).abs().max()) for rid in ref)
    positions, total, near_ties, examples = 0, 0, 0, []
    for rid, r in ref.items():
        toks = torch.tensor(tokens[rid])
        best = r.argmax(-1)
        positions += r.shape[0]
        for i in torch.nonzero(best != toks).flatten().tolist():
            gap = float(r[i].max() - r[i, toks[i]])
            tie = gap <= 2 * max_abs + 1e-6
            total += 1
            near_ties += tie
            if len(examples) < 8:
                examples.append({"req": rid, "pos": i, "ref_token": int(best[i]), "token": int(toks[i]),
                                 "ref_gap": gap, "near_tie": tie})
    return {"max_abs_dlogit": max_abs, "positions": positions, "greedy_mismatches": total,
            "greedy_mismatches_not_near_tie": total - near_ties, "mismatch_examples": examples}


def snap_compare(a: dict, b: dict, swap_tol: float = 1e-2, max_swapped: int = 2) -> dict:
    """Per stage (prompt_end, final): lists whose choice / length / kept positions differ.

    ``a`` is the Triton run, ``b`` the torch run. The two paths add the same attention
    probabilities to the slot scores in a different order, so two slots whose scores
    agree to rounding can trade places at a keep/evict boundary. A list whose choice and
    length agree and whose kept sets differ by at most ``max_swapped`` positions on each
    side counts as a *boundary swap*, not a mismatch, when the slots kept by one run only
    and the slots kept by the other only have scores within ``swap_tol`` of each other,
    relative to the largest score of that list (sorted pairwise, each run's own scores).
    A swap changes what later tokens attend to, so the requests it touches are listed
    (``swapped_requests``) for the logit comparison.
    """
    out = {"lists": 0, "choice_mismatches": 0, "lens_mismatches": 0, "kept_mismatches": 0, "boundary_swaps": 0,
           "swapped_requests": [], "max_swap_rel_gap": 0.0, "examples": []}
    for rid in a:
        for stage in ("prompt_end", "final"):
            x, y = a[rid].get(stage), b[rid].get(stage)
            if x is None or y is None:
                out["examples"].append({"req": rid, "stage": stage, "missing": True})
                out["kept_mismatches"] += 1
                continue
            out["lists"] += x["lens"].numel()
            choice = x["choice"] != y["choice"]
            lens = x["lens"] != y["lens"]
            width = max(x["kept"].shape[-1], y["kept"].shape[-1])
            kx, ky = pad(x["kept"], width), pad(y["kept"], width)
            kept = (kx != ky).any(-1)
            out["choice_mismatches"] += int(choice.sum())
            out["lens_mismatches"] += int(lens.sum())
            for layer, head in (kept & ~choice & ~lens).nonzero().tolist():
                swap = boundary_swap(x, y, layer, head, max_swapped)
                if swap is not None and swap <= swap_tol:
                    kept[layer, head] = False
                    out["boundary_swaps"] += 1
                    out["max_swap_rel_gap"] = max(out["max_swap_rel_gap"], swap)
                    if rid not in out["swapped_requests"]:
                        out["swapped_requests"].append(rid)
                    add_example(out, rid, stage, x, y, kx, ky, layer, head, swap, tolerated=True)
            out["kept_mismatches"] += int(kept.sum())
            for layer, head in (choice | lens | kept).nonzero().tolist()[:4]:
                add_example(out, rid, stage, x, y, kx, ky, layer, head,
                            boundary_swap(x, y, layer, head, max_swapped), tolerated=False)
    return out


def boundary_swap(x: dict, y: dict, layer: int, head: int, max_swapped: int) -> float | None:
    """Relative score gap of the slots one run kept and the other did not, or None when
    more than ``max_swapped`` (or unequal numbers of) positions differ."""
    import torch

    px, py = x["kept"][layer, head], y["kept"][layer, head]
    sx, sy = x["score"][layer, head], y["score"][layer, head]
    only_x = torch.isin(px, py[py >= 0], invert=True) & (px >= 0)
    only_y = torch.isin(py, px[px >= 0], invert=True) & (py >= 0)
    n = int(only_x.sum())
    if n == 0 or n != int(only_y.sum()) or n > max_swapped:
        return None
    gap = (sx[only_x].sort().values - sy[only_y].sort().values).abs().max()
    scale = max(float(sx.nan_to_num(0).abs().max()), float(sy.nan_to_num(0).abs().max()), 1e-12)
    return float(gap) / scale


def add_example(out, rid, stage, x, y, kx, ky, layer, head, swap_gap, tolerated: bool) -> None:
    if len(out["examples"]) >= 8:
        return
    diff = set(kx[layer, head].tolist()) ^ set(ky[layer, head].tolist())
    out["examples"].append({"req": rid, "stage": stage, "layer": layer, "head": head,
                            "choice": [int(x["choice"][layer, head]), int(y["choice"][layer, head])],
                            "lens": [int(x["lens"][layer, head]), int(y["lens"][layer, head])],
                            "positions_differing": len(diff - {-1}), "swap_rel_gap": swap_gap,
                            "tolerated_as_boundary_swap": tolerated})


def pad(t, width: int):
    import torch

    if t.shape[-1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=-1)


def run_summary(res: RunResult) -> dict:
    ms = sorted(res.step_ms)
    return {"steps": res.steps, "mixed_steps": res.mixed_steps, "wall_s": round(res.wall_s, 3),
            "step_ms_mean": sum(ms) / len(ms), "step_ms_median": ms[len(ms) // 2],
            "evicted_tokens": res.evicted_tokens, "slots_kept_fraction": res.slots_kept_fraction,
            "head_policy_counts": res.head_policy_counts}


# --------------------------------------------------------------------------- the checks


class Checker:
    """Runs the checks one by one; each one's result lands in ``doc`` (saved after each)."""

    def __init__(self, args, shape: Shape, device, doc: dict, out: Path):
        import torch

        self.torch, self.args, self.shape, self.device = torch, args, shape, device
        self.doc, self.out = doc, out
        self.checks: dict = doc["checks"]
        self.runs: dict = doc["runs"]
        self.audits: list = []  # (run, failures, pages_in_use_after)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, text: str) -> None:
        print(f"[gpu_check {self.elapsed():6.1f}s] {text}", flush=True)

    def save(self) -> None:
        doc = self.doc
        doc["failures"] = [name for name, c in self.checks.items() if c["passed"] is False]
        doc["skipped"] = [name for name, c in self.checks.items() if c.get("skipped")]
        doc["passed"] = bool(self.checks) and not doc["failures"] and not doc["skipped"]
        doc["seconds"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(doc, indent=1, default=str))

    def record(self, name: str, passed: bool | None, **numbers) -> None:
        self.checks[name] = {"passed": passed, **numbers}
        state = "info" if passed is None else ("PASS" if passed else "FAIL")
        self.log(f"{name}: {state} {short(numbers)}")

    def guarded(self, name: str, fn) -> None:
        """Run one check; an exception fails it (with the traceback's tail) and the run goes on.

        Past the time budget the check is skipped (recorded as such: the run is incomplete).
        """
        budget = self.args.time_budget
        if budget and self.elapsed() > budget:
            self.checks[name] = {"passed": None, "skipped": f"time budget of {budget:.0f} s spent"}
            self.log(f"{name}: SKIPPED (time budget)")
            self.save()
            return
        started = time.perf_counter()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 (one failed check must not lose the others)
            self.record(name, False, error=f"{type(err).__name__}: {err}",
                        traceback=traceback.format_exc()[-3000:])
        self.checks.get(name, {}).setdefault("seconds", round(time.perf_counter() - started, 2))
        self.save()

    def engine(self, run_name, model, prompts, policy, settings, impl, dtype, flags, forced=None) -> RunResult:
        res = run_engine(model, self.shape, prompts, policy, settings, impl, self.device, dtype, flags, forced)
        self.runs[run_name] = run_summary(res)
        self.audits.append((run_name, res.audit_failures, res.pages_in_use_after))
        self.log(f"  run {run_name}: {res.steps} steps ({res.mixed_steps} mixing prefill and decode), "
                 f"{res.wall_s:.1f} s, kept {res.slots_kept_fraction:.2f} of the slots written")
        return res

    def run_checks(self) -> None:
        torch, shape = self.torch, self.shape
        prompts = make_prompts(shape, self.args.seed)
        flags = token_flags(shape.vocab)
        model = build_model(shape, self.args.seed, self.args.qk_gain, self.device, torch.float32)
        self.log(f"model built: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")

        self.guarded("full_vs_dense_fp32", lambda: self.full_vs_dense(model, prompts, flags, torch.float32,
                                                                      self.args.logit_tol))
        for policy, settings in POLICIES.items():
            self.guarded(f"triton_vs_torch_{policy}", lambda p=policy, s=settings: self.triton_vs_torch(
                model, prompts, p, s, flags))
        if shape.bf16:
            self.guarded("full_vs_dense_bf16", lambda: self.full_vs_dense(None, prompts, flags, torch.bfloat16, None))
        failures = [f"{run}: {f}" for run, fails, _ in self.audits for f in fails]
        leaks = {run: n for run, _, n in self.audits if n}
        self.record("pool_audit", not failures and not leaks and bool(self.audits), runs=len(self.audits),
                    audit_failures=failures[:8], pages_in_use_after_release=leaks)
        self.save()

    def full_vs_dense(self, model, prompts, flags, dtype, tol) -> None:
        """Policy full (Triton path) against the dense model; ``tol`` None: informative only."""
        tag = "fp32" if dtype == self.torch.float32 else "bf16"
        if model is None:
            model = build_model(self.shape, self.args.seed, self.args.qk_gain, self.device, dtype)
        res = self.engine(f"full_triton_{tag}", model, prompts, "full", {}, "triton", dtype, flags)
        ref = {f"r{i}": dense_logits(model, p, res.tokens[f"r{i}"], self.device) for i, p in enumerate(prompts)}
        cmp = logit_compare(ref, res.logits, res.tokens)
        passed = None if tol is None else (cmp["max_abs_dlogit"] <= tol and cmp["greedy_mismatches_not_near_tie"] == 0)
        self.record(f"full_vs_dense_{tag}", passed, logit_tol=tol, dense_attention="sdpa", **cmp)

    def triton_vs_torch(self, model, prompts, policy, settings, flags) -> None:
        torch = self.torch
        tri = self.engine(f"{policy}_triton", model, prompts, policy, settings, "triton", torch.float32, flags)
        ref = self.engine(f"{policy}_torch", model, prompts, policy, settings, "torch", torch.float32, flags,
                          forced=tri.tokens)
        lists = snap_compare(tri.snaps, ref.snaps, self.args.swap_tol)
        # A boundary swap changes what later tokens attend to: those requests' logits are
        # reported, and their greedy tokens must still agree up to near-ties, but the fp32
        # tolerance is judged on the requests whose lists matched exactly.
        exact = [rid for rid in ref.logits if rid not in lists["swapped_requests"]]
        logits = logit_compare({r: ref.logits[r] for r in exact}, tri.logits, tri.tokens) if exact else {}
        every = logit_compare(ref.logits, tri.logits, tri.tokens)
        logits["swapped_max_abs_dlogit"] = every["max_abs_dlogit"]
        logits["greedy_mismatches_not_near_tie_all"] = every["greedy_mismatches_not_near_tie"]
        passed = (bool(exact) and logits["max_abs_dlogit"] <= self.args.logit_tol
                  and every["greedy_mismatches_not_near_tie"] == 0 and lists["choice_mismatches"] == 0
                  and lists["lens_mismatches"] == 0 and lists["kept_mismatches"] == 0)
        self.record(f"triton_vs_torch_{policy}", passed, settings=settings, logit_tol=self.args.logit_tol,
                    evicted_tokens=tri.evicted_tokens, slots_kept_fraction=tri.slots_kept_fraction,
                    head_policy_counts=tri.head_policy_counts,
                    step_ms_mean={"triton": self.runs[f"{policy}_triton"]["step_ms_mean"],
                                  "torch": self.runs[f"{policy}_torch"]["step_ms_mean"]},
                    **{f"logits_{k}": v for k, v in logits.items()}, **lists)

    def run_timing(self) -> None:
        def timing():
            self.doc["timing"] = run_timing(self.shape, self)
            fails = self.doc["timing"]["failures"]
            self.record("kernel_checks", not fails, failures=fails[:8], rows=len(self.doc["timing"]["rows"]))

        self.guarded("kernel_checks", timing)


# --------------------------------------------------------------------------- kernel timing


def run_timing(shape: Shape, checker: Checker) -> dict:
    """scripts/bench_kernels.py's KernelBench over a short sweep (+ xformers where installed)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_kernels

    bargs = bench_kernels.build_parser().parse_args([*shape.bench, "--families", BENCH_FAMILIES])
    bench_kernels.defaults(bargs)
    xformers = xformers_ops()

    class Bench(bench_kernels.KernelBench):
        def timed(self, fn):
            if self.args.tiny:  # the interpreter: one call's wall time, only to run the arithmetic
                started = time.perf_counter()
                fn()
                return (time.perf_counter() - started) * 1e3
            return super().timed(fn)

        def decode_dense(self, batch, length, shape_, scale, check_err):
            super().decode_dense(batch, length, shape_, scale, check_err)
            if xformers is not None:
                self.xformers_row("decode", shape_, batch, 1, length, scale)

        def prefill_one(self, batch, ctx, chunk, shape_):
            super().prefill_one(batch, ctx, chunk, shape_)
            if xformers is not None:
                self.xformers_row("prefill", shape_, batch, chunk, ctx, scale=self.m.head_dim ** -0.5)

        def xformers_row(self, family, shape_, batch, queries, length, scale):
            """xformers memory_efficient_attention on dense K/V (BMGHK layout: K/V heads broadcast)."""
            m = self.m
            try:
                q = self.randn(batch, queries, m.kv_heads, m.group, m.head_dim)
                k = self.randn(batch, length, m.kv_heads, 1, m.head_dim).expand(-1, -1, -1, m.group, -1)
                v = self.randn(batch, length, m.kv_heads, 1, m.head_dim).expand(-1, -1, -1, m.group, -1)
                bias = None
                if queries > 1:
                    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

                    bias = LowerTriangularFromBottomRightMask()
                fn = lambda: xformers.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)  # noqa: E731
                fn()
                self.sync()
                ms = self.timed(fn)
                tokens = batch * m.kv_heads * length
                self.add(family, shape_, "dense-xformers", ms, 2 * tokens * m.head_dim * self.esize
                         + 2 * q.numel() * self.esize, tokens)
            except Exception as err:  # noqa: BLE001 (an optional baseline)
                self.rows.append({"family": family, **shape_, "variant": "dense-xformers", "ms": None,
                                  "note": f"failed: {type(err).__name__}: {err}"[:300]})

    bench = Bench(bargs)
    started = time.perf_counter()
    bench.measure_peak()
    skipped = []
    for family in bargs.families:
        budget = checker.args.time_budget
        if budget and checker.elapsed() > budget:
            skipped.append(family)
            continue
        getattr(bench, f"run_{family}")()
        checker.log(f"  timed {family}")
    if skipped:
        bench.failures.append(f"not timed (time budget of {budget:.0f} s spent): {', '.join(skipped)}")
    return {"model": dict(bench.m.__dict__, name="tiny" if bargs.tiny else "llama-3-8b-like"),
            "dtype": bargs.dtype, "args": list(shape.bench), "families": bargs.families,
            "not_timed": {"stats": "window_attention_colsum: the runtime does not call it",
                          **{f: "time budget spent" for f in skipped}},
            "xformers": None if xformers is None else "memory_efficient_attention",
            "timings_meaningful": not bargs.tiny, "peak_copy": bench.peak, "rows": bench.rows,
            "failures": bench.failures, "seconds": round(time.perf_counter() - started, 2)}


def xformers_ops():
    try:
        import xformers.ops as xops

        return xops
    except Exception:  # noqa: BLE001 (not installed, or built for another torch)
        return None


# --------------------------------------------------------------------------- report


def short(numbers: dict) -> str:
    keys = ("max_abs_dlogit", "logits_max_abs_dlogit", "greedy_mismatches", "choice_mismatches",
            "lens_mismatches", "kept_mismatches", "boundary_swaps", "slots_kept_fraction", "runs", "failures", "error", "skipped")
    parts = []
    for k in keys:
        if k in numbers:
            v = numbers[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def environment(torch, device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "xformers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            env[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    else:
        env["device"] = f"CPU ({platform.machine()}), Triton interpreter"
    try:
        import subprocess

        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 (a copy without .git)
        env["commit"] = None
    return env


def summary(doc: dict) -> str:
    lines = [f"gpu_check ({doc['mode']}): {doc['device']}; torch {doc['torch']}, triton {doc['triton']}, "
             f"transformers {doc['transformers']}; {doc['seconds']:.0f} s"]
    for name, c in doc["checks"].items():
        state = "skip" if c.get("skipped") else "info" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")
        lines.append(f"  {state:4} {name}: {short(c)}")
    for name, r in doc["runs"].items():
        lines.append(f"  run {name}: {r['steps']} steps ({r['mixed_steps']} mixed), "
                     f"{r['step_ms_mean']:.1f} ms/step mean, kept {r['slots_kept_fraction']:.2f}")
    timing = doc.get("timing")
    if timing and timing.get("rows"):
        peak = timing["peak_copy"].get("gb_per_s")
        lines.append(f"  timing ({'meaningless: interpreter' if not timing['timings_meaningful'] else 'CUDA events'})"
                     f", peak copy {peak:.0f} GB/s" if peak else "  timing")
        for r in timing["rows"]:
            if r.get("ms") is None:
                continue
            shape = ",".join(f"{k}={r[k]}" for k in ("batch", "context", "kept", "chunk") if k in r)
            gbps = f"{r['gb_per_s']:.0f} GB/s" if r.get("gb_per_s") else ""
            lines.append(f"    {r['family']:8} {shape:34} {r['variant']:24} {r['ms']:9.3f} ms {gbps}")
    if doc["failures"]:
        result = "FAIL: " + "; ".join(doc["failures"])
    elif doc["skipped"]:
        result = "INCOMPLETE (time budget): skipped " + "; ".join(doc["skipped"])
    else:
        result = "PASS" if doc["passed"] else "NOTHING RUN"
    lines.append("result: " + result)
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Triton fixes interpreter vs compiled mode when the kernels are imported (decorated):
    # the interpreter for --dry-run, compiled kernels on the GPU.
    interpreted = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")
    if interpreted != args.dry_run:
        if args.dry_run:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            del os.environ["TRITON_INTERPRET"]
        if "triton" in sys.modules:  # imported already: start again in the right mode
            os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                      *(sys.argv[1:] if argv is None else argv)])
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on an NVIDIA GPU, or use --dry-run on CPU", file=sys.stderr)
        return 2
    from vllm_adaptive_kv.triton_kernels import HAS_TRITON

    if not HAS_TRITON:
        print("gpu_check: triton is not importable", file=sys.stderr)
        return 2
    if args.time_budget is None and not args.dry_run:
        args.time_budget = 240.0
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.set_float32_matmul_precision("highest")  # fp32 checks: no TF32 in the model's matmuls
    shape = DRY if args.dry_run else (QUICK if args.quick else FULL)
    mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
    out = Path(args.out or default_out())
    doc = {"schema": SCHEMA, "mode": mode, **environment(torch, device),
           "model": {"kind": "random LlamaForCausalLM (seeded)", "layers": shape.layers, "hidden": shape.hidden,
                     "intermediate": shape.intermediate, "heads": shape.heads, "kv_heads": shape.kv_heads,
                     "head_dim": shape.head_dim, "vocab": shape.vocab, "rope_theta": 1e5, "tied_embeddings": True,
                     "qk_gain": args.qk_gain, "seed": args.seed},
           "workload": {"prompts": list(shape.prompts), "new_tokens": shape.new_tokens,
                        "token_budget": shape.budget, "block_size": shape.block_size,
                        "observation_window": shape.observation_window, "snapkv_window": shape.snapkv_window,
                        "policies": POLICIES, "dtype": "float32 (checks), bfloat16 (timing)",
                        "token_flags": "synthetic: ids 0-2 special, id % 23 == 5 punctuation"},
           "time_budget_s": args.time_budget, "checks": {}, "runs": {}, "timing": None}
    checker = Checker(args, shape, device, doc, out)
    checker.log(f"{mode} on {doc['device']}; writing {out}")
    try:
        if not args.skip_checks:
            checker.run_checks()
        if not args.skip_timing:
            checker.run_timing()
    finally:
        checker.save()
    print(summary(doc))
    print(f"wrote {out}")
    if doc["failures"]:
        return 1
    return 0 if doc["passed"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
