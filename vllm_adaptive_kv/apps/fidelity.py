"""Teacher-forced fidelity through vLLM: NLL and KL of a compressed cache on the full
cache's own continuation, with decode-time eviction in the loop.

Why not prompt logprobs: scoring the reference continuation as a prompt would run it
as prefill, where the plugin profiles and evicts once at the end; the eviction that
happens every ``block_size`` generated tokens (and FastGen's per-head decode policy)
would never run. Instead the continuation is *generated*, one token a step, and a
logits processor forces each step's token to be the reference's:

1. reference run (the full cache, greedy, free-running): ``record`` mode stores each
   step's full next-token log-distribution ``log P`` (float16, every vocabulary entry)
   in ``<dir>/<key>.ref`` and leaves the logits alone, so the output is the usual
   greedy continuation ``y``.
2. scored run (any setting): ``force`` mode reads ``log Q`` from the raw logits of
   each step (before anything changes them), appends ``step, -log Q(y_t),
   KL(P_t || Q_t), argmax Q_t == y_t`` to ``<dir>/<key>.scores``, then sets every
   logit but ``y_t``'s to -inf, so greedy sampling emits ``y_t`` and the next step
   sees the reference prefix, evicted exactly as the plugin evicts while generating.

KL is exact over the whole vocabulary (no top-k), up to the float16 storage of
``log P`` (about 1e-3 relative). The processor runs in the engine process; the files
are the channel back (vLLM returns only the sampled token's and top-k logprobs).
It is an evaluation tool: the eval passes ``TeacherForcing`` to ``vllm.LLM``'s
``logits_processors``; requests without the ``FIDELITY_ARG`` key are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FIDELITY_ARG = "adaptive_kv_fidelity"  # the SamplingParams.extra_args key


def record_args(directory: str | Path, key: str) -> dict:
    """extra_args of a reference request: store its next-token distributions under ``key``."""
    return {FIDELITY_ARG: {"mode": "record", "dir": str(directory), "key": key}}


def force_args(directory: str | Path, key: str, reference: str, tokens: list[int]) -> dict:
    """extra_args of a scored request: force ``tokens`` and score them against ``reference``."""
    return {FIDELITY_ARG: {"mode": "force", "dir": str(directory), "key": key, "reference": reference,
                           "tokens": [int(t) for t in tokens]}}


def _steps_path(ref_path: Path) -> Path:
    return ref_path.with_name(ref_path.name + ".steps")


class _Record:
    """Appends each call's log-distribution to ``<key>.ref`` and its step to ``<key>.ref.steps``.

    The step is recorded because vLLM also runs logits processors on a prompt's partial
    prefill chunks and discards what they sample: a long prompt split over two steps
    gives two calls at step 0, and only the last one is the real distribution.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        _steps_path(path).unlink(missing_ok=True)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.to(torch.float32), dim=-1).clamp_min(-60000.0)
        with open(self.path, "ab") as f:
            f.write(logp.to(torch.float16).cpu().numpy().tobytes())
        with open(_steps_path(self.path), "a") as f:
            f.write(f"{len(output_ids)}\n")
        return logits


def load_reference(ref_path: Path, vocab: int) -> dict[int, torch.Tensor]:
    """step -> the recorded ``log P`` row ``[vocab]``; a step recorded twice keeps its last row."""
    import numpy as np

    rows = torch.from_numpy(np.fromfile(ref_path, dtype=np.float16).astype(np.float32)).view(-1, vocab)
    steps = [int(line) for line in _steps_path(ref_path).read_text().split()]
    if len(steps) != rows.shape[0]:
        raise RuntimeError(f"{ref_path}: {rows.shape[0]} rows but {len(steps)} recorded steps")
    return {step: rows[i] for i, step in enumerate(steps)}


class _Force:
    def __init__(self, spec: dict) -> None:
        directory = Path(spec["dir"])
        self.tokens = list(spec["tokens"])
        self.ref_path = directory / f"{spec['reference']}.ref"
        self.out = directory / f"{spec['key']}.scores"
        self.out.unlink(missing_ok=True)
        self.ref: dict[int, torch.Tensor] | None = None

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        # A partial prefill chunk also calls this at step 0; read_scores keeps a step's last row.
        step = len(output_ids)
        if step >= len(self.tokens):
            return logits
        if self.ref is None:
            self.ref = load_reference(self.ref_path, logits.numel())
        target = self.tokens[step]
        logq = torch.log_softmax(logits.to(torch.float32), dim=-1)
        kl = float("nan")  # read_scores refuses it: the reference lacks this step
        if step in self.ref:
            logp = self.ref[step].to(logq.device)
            kl = float((logp.exp() * (logp - logq)).sum())
        with open(self.out, "a") as f:
            f.write(f"{step} {-float(logq[target])!r} {kl!r} {int(torch.argmax(logits)) == target:d}\n")
        forced = torch.full_like(logits, float("-inf"))
        forced[target] = 0.0
        return forced


class TeacherForcing(AdapterLogitsProcessor):
    """vLLM logits processor for the fidelity metric (see the module docstring)."""

    def is_argmax_invariant(self) -> bool:
        return False  # force mode picks the token

    def new_req_logits_processor(self, params):
        spec = (params.extra_args or {}).get(FIDELITY_ARG)
        if not spec:
            return None
        if spec.get("mode") == "record":
            return _Record(Path(spec["dir"]) / f"{spec['key']}.ref")
        if spec.get("mode") == "force":
            return _Force(spec)
        raise ValueError(f"{FIDELITY_ARG} mode={spec.get('mode')!r} is invalid: allowed values are record, force")


@dataclass(frozen=True)
class ForcedScores:
    """Per-step scores of one forced request."""

    nll: list[float]
    kl: list[float]
    top1: list[bool]

    @property
    def steps(self) -> int:
        return len(self.nll)


def read_scores(directory: str | Path, key: str, steps: int) -> ForcedScores:
    """The scores the engine wrote for ``key``; exactly ``steps`` rows in step order, else an error."""
    path = Path(directory) / f"{key}.scores"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise RuntimeError(f"no forced scores for {key!r} at {path}: was TeacherForcing given to the engine's "
                           "logits_processors?") from None
    rows = {}
    for line in lines:  # a step written twice (a partial prefill chunk, then the real step): the last counts
        step, nll, kl, top1 = line.split()
        rows[int(step)] = (float(nll), float(kl), top1 == "1")
    if sorted(rows) != list(range(steps)):
        raise RuntimeError(f"forced scores for {key!r} cover steps {sorted(rows)[:5]}... ({len(rows)}), "
                           f"expected 0..{steps - 1}")
    nll, kl, top1 = zip(*(rows[s] for s in range(steps))) if steps else ((), (), ())
    if any(math.isnan(k) for k in kl):
        raise RuntimeError(f"forced scores for {key!r} lack the reference distribution of some steps")
    return ForcedScores(list(nll), list(kl), list(top1))


def summarize(scores: list[ForcedScores]) -> dict:
    """Token-weighted means over every forced step of every prompt."""
    steps = sum(s.steps for s in scores)
    if not steps:
        return {"forced_tokens": 0, "nll": None, "kl": None, "forced_agreement": None}
    return {
        "forced_tokens": steps,
        "nll": sum(sum(s.nll) for s in scores) / steps,
        "kl": sum(sum(s.kl) for s in scores) / steps,
        "forced_agreement": 100.0 * sum(sum(s.top1) for s in scores) / steps,
    }
