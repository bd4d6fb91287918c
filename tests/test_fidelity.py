"""Teacher-forced fidelity (apps/fidelity.py), the per-request logits processors without an
engine: what record mode stores, what force mode scores and emits. The engine path runs in
tests/test_eval.py's quick run."""

from __future__ import annotations

import math

import pytest
import torch
from vllm import SamplingParams

from vllm_adaptive_kv.apps.fidelity import (
    TeacherForcing,
    force_args,
    read_scores,
    record_args,
    summarize,
)

VOCAB = 11


def processor_for(args: dict):
    """The per-request processor vLLM would build for a request with these extra_args."""
    lp = TeacherForcing.__new__(TeacherForcing)  # its per-request factory needs no engine state
    return lp.new_req_logits_processor(SamplingParams(extra_args=args))


def test_record_then_force_scores_nll_kl_and_top1(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ref_logits = [torch.randn(VOCAB, generator=gen) for _ in range(3)]
    record = processor_for(record_args(tmp_path, "ref-0"))
    out: list[int] = []
    for logits in ref_logits:
        assert torch.equal(record(out, logits.clone()), logits)  # record mode changes nothing
        out.append(int(logits.argmax()))
    reference = out
    q_logits = [torch.randn(VOCAB, generator=gen) for _ in range(3)]
    q_logits[1][reference[1]] = 50.0  # step 1: the compressed cache agrees
    force = processor_for(force_args(tmp_path, "run1-0", "ref-0", reference))
    emitted: list[int] = []
    for logits in q_logits:
        forced = force(emitted, logits.clone())
        assert torch.isfinite(forced).sum() == 1 and int(forced.argmax()) == reference[len(emitted)]
        emitted.append(int(forced.argmax()))
    assert emitted == reference
    assert force(emitted, q_logits[0].clone()) is not None  # past the reference: logits pass through
    scores = read_scores(tmp_path, "run1-0", 3)
    for step in range(3):
        logp = torch.log_softmax(ref_logits[step], -1)
        logq = torch.log_softmax(q_logits[step], -1)
        assert scores.nll[step] == pytest.approx(-float(logq[reference[step]]), abs=1e-5)
        want_kl = float((logp.exp() * (logp - logq)).sum())
        assert scores.kl[step] == pytest.approx(want_kl, rel=2e-3, abs=1e-4)  # log P stored in float16
        assert scores.top1[step] == (int(q_logits[step].argmax()) == reference[step])
    assert scores.top1[1]
    summary = summarize([scores])
    assert summary["forced_tokens"] == 3 and summary["nll"] == pytest.approx(sum(scores.nll) / 3)
    assert summary["forced_agreement"] == pytest.approx(100 * sum(scores.top1) / 3)


def test_forcing_the_reference_under_the_same_distribution_gives_zero_kl(tmp_path):
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    record = processor_for(record_args(tmp_path, "ref-1"))
    for i in range(4):
        record(list(range(i)), logits[i].clone())
    tokens = [int(t) for t in logits.argmax(-1)]
    force = processor_for(force_args(tmp_path, "same", "ref-1", tokens))
    for i in range(4):
        force(tokens[:i], logits[i].clone())
    scores = read_scores(tmp_path, "same", 4)
    assert max(abs(k) for k in scores.kl) < 1e-3 and all(scores.top1)


def test_requests_without_the_key_are_untouched_and_bad_modes_named(tmp_path):
    assert processor_for({"kv_policy": "fastgen"}) is None
    with pytest.raises(ValueError, match="mode='replay' is invalid: allowed values are record, force"):
        processor_for({"adaptive_kv_fidelity": {"mode": "replay"}})


def test_read_scores_names_missing_or_incomplete_runs(tmp_path):
    with pytest.raises(RuntimeError, match="no forced scores for 'x'"):
        read_scores(tmp_path, "x", 2)
    (tmp_path / "y.scores").write_text("0 1.0 0.5 1\n")
    with pytest.raises(RuntimeError, match="expected 0..1"):
        read_scores(tmp_path, "y", 2)
    (tmp_path / "z.scores").write_text("0 1.0 nan 1\n")
    with pytest.raises(RuntimeError, match="lack the reference distribution"):
        read_scores(tmp_path, "z", 1)
    assert summarize([])["nll"] is None and not math.isnan(summarize([read_scores(tmp_path, "y", 1)])["kl"])


def test_a_partial_prefill_chunk_at_step_0_is_overwritten_by_the_real_step(tmp_path):
    """vLLM runs logits processors on a long prompt's partial prefill chunk too, and throws
    away what it samples: both modes see step 0 twice, and only the second call is real."""
    gen = torch.Generator().manual_seed(2)
    chunk, real = torch.randn(VOCAB, generator=gen), torch.randn(3, VOCAB, generator=gen)
    record = processor_for(record_args(tmp_path, "ref-2"))
    record([], chunk.clone())  # the discarded partial-chunk call
    for i in range(3):
        record(list(range(i)), real[i].clone())
    tokens = [int(t) for t in real.argmax(-1)]
    force = processor_for(force_args(tmp_path, "twice", "ref-2", tokens))
    force([], chunk.clone())  # the compressed run's own partial chunk
    for i in range(3):
        force(tokens[:i], real[i].clone())
    scores = read_scores(tmp_path, "twice", 3)
    assert max(abs(k) for k in scores.kl) < 1e-3 and all(scores.top1)  # P and Q aligned step by step
