"""Keep masks of every policy, on ragged, compacted head lists."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive_kv.core.layout import FLAG_PUNCT, FLAG_SPECIAL
from vllm_adaptive_kv.core.policies import (
    FASTGEN_LADDER,
    H2O,
    FastGen,
    Frequent,
    Full,
    Local,
    Punctuation,
    SlotView,
    SnapKV,
    SpecialTokens,
    StreamingLLM,
    Union,
    make_policy,
    top_k_mask,
)


def random_view(seed: int, heads: int = 5, n: int = 40, gaps: bool = True) -> SlotView:
    """Ragged lists of a compacted cache: increasing positions with gaps, random flags/scores."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n + 1, (heads,), generator=gen)
    lengths[0] = n
    lengths[1] = 0
    steps = torch.randint(1, 4 if gaps else 2, (heads, n), generator=gen)
    positions = torch.cumsum(steps, 1) - 1
    seq_len = positions.gather(1, (lengths - 1).clamp_min(0)[:, None])[:, 0] + 1 + torch.randint(0, 3, (heads,), generator=gen)
    flags = torch.randint(0, 4, (heads, n), generator=gen).to(torch.uint8)
    scores = torch.rand(heads, n, generator=gen)
    return SlotView(flags=flags, positions=positions, scores=scores, lengths=lengths, seq_len=seq_len)


def brute_valid(view, h):
    return range(int(view.lengths[h]))


@pytest.mark.parametrize("seed", range(4))
def test_component_policies_match_their_definitions(seed):
    view = random_view(seed)
    special = SpecialTokens().keep_mask(view)
    punct = Punctuation().keep_mask(view)
    local = Local(0.3).keep_mask(view)
    frequent = Frequent(0.25).keep_mask(view)
    full = Full().keep_mask(view)
    for h in range(view.lengths.numel()):
        valid = set(brute_valid(view, h))
        seq = int(view.seq_len[h])
        window = math.ceil(0.3 * seq)
        k = math.ceil(0.25 * seq)
        ranked = sorted(valid, key=lambda j: (-float(view.scores[h, j]), j))[:k]
        for j in range(view.flags.shape[1]):
            in_list = j in valid
            assert bool(special[h, j]) == (in_list and bool(view.flags[h, j] & FLAG_SPECIAL))
            assert bool(punct[h, j]) == (in_list and bool(view.flags[h, j] & FLAG_PUNCT))
            assert bool(local[h, j]) == (in_list and int(view.positions[h, j]) >= seq - window)
            assert bool(frequent[h, j]) == (j in ranked)
            assert bool(full[h, j]) == in_list


def test_fastgen_ladder_is_nested_and_choice_selects_a_rung():
    view = random_view(7, heads=6)
    policy = FastGen(recovery_ratio=0.9)
    rungs = policy.candidate_masks(view)
    assert rungs.shape[0] == len(FASTGEN_LADDER)
    for c in range(1, rungs.shape[0]):
        assert bool((rungs[c - 1] & ~rungs[c]).sum() == 0), "a rung drops a token its predecessor kept"
    choice = torch.tensor([0, 1, 2, 3, 4, 2])
    keep = policy.keep_mask(view, choice)
    for h, c in enumerate(choice.tolist()):
        assert torch.equal(keep[h], rungs[c, h])
    union = Union((SpecialTokens(), Punctuation(), Frequent(0.3), Local(0.3))).keep_mask(view)
    assert torch.equal(rungs[3], union)


@pytest.mark.parametrize("seed", range(3))
def test_baselines_respect_budget_and_keep_their_anchors(seed):
    view = random_view(seed, heads=6, n=60, gaps=False)
    for policy in (StreamingLLM(budget_ratio=0.4, sink_tokens=4), H2O(budget_ratio=0.4), SnapKV(budget_ratio=0.4, window=8)):
        keep = policy.keep_mask(view)
        assert not bool((keep & ~view.valid).any()), f"{policy.name} kept padding"
        budget = torch.ceil(view.seq_len * 0.4)
        assert bool((keep.sum(1) <= budget).all()), f"{policy.name} exceeds its budget"
    stream = StreamingLLM(budget_ratio=0.4, sink_tokens=4).keep_mask(view)
    assert bool((stream[0, :4]).all()), "sinks must be kept"
    h2o = H2O(budget_ratio=0.4, recent_fraction=0.5).keep_mask(view)
    newest = view.lengths[0] - 1
    assert bool(h2o[0, newest]), "h2o keeps the most recent token"


def test_snapkv_pools_neighbours_of_a_peak():
    n = 30
    scores = torch.zeros(1, n)
    scores[0, 10] = 1.0
    view = SlotView(
        flags=torch.zeros(1, n, dtype=torch.uint8),
        positions=torch.arange(n)[None],
        scores=scores,
        lengths=torch.tensor([n]),
        seq_len=torch.tensor([n]),
    )
    keep = SnapKV(budget_ratio=0.3, window=2, pool_kernel=5).keep_mask(view)
    assert bool(keep[0, 8:13].all()), "the peak and its pooled neighbours are kept"
    assert bool(keep[0, 28:].all()), "the observation window is kept"
    assert int(keep.sum()) == 9


def test_top_k_breaks_ties_by_lower_index():
    scores = torch.ones(1, 6)
    keep = top_k_mask(scores, torch.tensor([2]), torch.ones(1, 6, dtype=torch.bool))
    assert keep.tolist() == [[True, True, False, False, False, False]]


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("fastgen", {"recovery_ratio": 1.5}, "recovery_ratio=1.5"),
        ("fastgen", {"recovery_ratio": 0}, r"recovery_ratio=0 .*\(0, 1\]"),
        ("fastgen", {"local_ratio": -0.1}, "local_ratio=-0.1"),
        ("fastgen", {"frequent_ratio": "high"}, "frequent_ratio='high'"),
        ("h2o", {"budget_ratio": 2}, "budget_ratio=2"),
        ("snapkv", {"pool_kernel": 4}, "pool_kernel=4 .*odd"),
        ("streamingllm", {"sink_tokens": -1}, "sink_tokens=-1"),
        ("fastgen", {"budget": 0.5}, "unknown hyperparameter.*budget.*allowed keys are recovery_ratio"),
        ("magic", {}, "kv_policy='magic' is unknown: allowed values are full, fastgen"),
    ],
)
def test_bad_hyperparameters_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **kwargs)


def test_slot_view_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="positions shape"):
        SlotView(
            flags=torch.zeros(2, 3, dtype=torch.uint8),
            positions=torch.zeros(2, 4),
            scores=torch.zeros(2, 3),
            lengths=torch.zeros(2),
            seq_len=torch.zeros(2),
        )
