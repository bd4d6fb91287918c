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
    FastGenPaper,
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
    policy = FastGen(recovery_ratio=0.9, recent_window=0)  # the paper's rungs: unions of the components
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


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("most_kept", [False, True])
def test_top_k_matches_a_stable_sort_with_ties(seed, most_kept):
    # the CPU's topk-and-tie-rank rule against the rule it replaces: a stable descending
    # sort's first k eligible slots; few distinct scores force ties at the k-th value.
    # most_kept: every k near the width, where the k-th value comes from the smallest
    gen = torch.Generator().manual_seed(seed)
    heads, width = 40, 1 + seed * 97
    scores = torch.randint(0, 4 + seed * (1 + 4 * most_kept), (heads, width), generator=gen).to(torch.bfloat16)
    eligible = torch.rand(heads, width, generator=gen) < (0.99 if most_kept else 0.8)
    if most_kept:
        k = width - torch.randint(-2, min(width, 6), (heads,), generator=gen)
    else:
        k = torch.randint(-3, width + 5, (heads,), generator=gen)
        k[:3] = torch.tensor([0, width, width + 2])
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width).expand_as(order))
    assert torch.equal(top_k_mask(scores, k, eligible), eligible & (rank < k[:, None]))


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("fastgen", {"recovery_ratio": 1.5}, "recovery_ratio=1.5"),
        ("fastgen", {"recovery_ratio": 0}, r"recovery_ratio=0 .*\(0, 1\]"),
        ("fastgen", {"local_ratio": -0.1}, "local_ratio=-0.1"),
        ("fastgen", {"frequent_ratio": "high"}, "frequent_ratio='high'"),
        ("h2o", {"budget_ratio": 2}, "budget_ratio=2"),
        ("snapkv", {"pool_kernel": 4}, "pool_kernel=4 .*odd"),
        ("fastgen", {"pool_kernel": 0}, "pool_kernel=0 .*odd"),
        ("fastgen-paper", {"pool_kernel": 3}, "pool_kernel=3 is invalid for kv_policy='fastgen-paper'"),
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


# --- FastGen variants beyond the paper: young tokens every compressed rung keeps ------------


def decode_view(prompt_len: int, seq_len: int, heads: int = 3, seed: int = 0) -> SlotView:
    """Uncompacted lists of one request ``seq_len`` long whose first ``prompt_len`` tokens are
    the prompt; no special or punctuation token; random scores, lowest on the newest tokens
    (generated tokens have had little time to gather attention)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq_len).expand(heads, seq_len)
    scores = torch.rand(heads, seq_len, generator=gen) + torch.linspace(1, 0, seq_len)
    full = torch.full((heads,), seq_len)
    return SlotView(flags=torch.zeros(heads, seq_len, dtype=torch.uint8), positions=positions, scores=scores,
                    lengths=full, seq_len=full, prompt_len=torch.full((heads,), prompt_len))


def test_paper_fastgen_drops_new_tokens_on_its_frequent_rung():
    """The hypothesis the variants address: on special+punct+frequent nothing young is kept
    when young tokens have the lowest scores."""
    view = decode_view(prompt_len=60, seq_len=100)
    rung = FASTGEN_LADDER.index("special+punct+frequent")
    keep = make_policy("fastgen-paper").keep_mask(view, torch.full((3,), rung))
    assert not bool(keep[:, 90:].any())
    assert torch.equal(keep, FastGen(recent_window=0, decode_protect=0).keep_mask(view, torch.full((3,), rung)))


@pytest.mark.parametrize("rung", range(len(FASTGEN_LADDER)))
def test_recent_window_is_kept_on_every_rung_and_counted(rung):
    view = decode_view(prompt_len=60, seq_len=100)
    choice = torch.full((3,), rung)
    paper = FastGen(recent_window=0).keep_mask(view, choice)
    keep = FastGen(recent_window=8).keep_mask(view, choice)
    assert bool(keep[:, 92:].all()), "the last 8 positions are kept"
    assert torch.equal(keep, paper | (view.positions >= 92)), "nothing else changes"
    assert bool((keep.sum(1) >= paper.sum(1)).all())  # the window costs memory, counted in the keep mask


def test_decode_protect_keeps_only_young_generated_tokens():
    view = decode_view(prompt_len=95, seq_len=100)
    rung = torch.full((3,), FASTGEN_LADDER.index("special+punct+frequent"))
    keep = FastGen(recent_window=0, decode_protect=16).keep_mask(view, rung)
    paper = FastGenPaper().keep_mask(view, rung)
    # generated: 95..99 (all within 16 of the end) are protected; prompt tokens 84..94 are not
    assert bool(keep[:, 95:].all())
    assert torch.equal(keep[:, :95], paper[:, :95])
    # a generated token older than decode_protect competes on its score again
    old = decode_view(prompt_len=40, seq_len=100)
    keep = FastGen(recent_window=0, decode_protect=16).keep_mask(old, rung)
    assert bool(keep[:, 84:].all())
    assert torch.equal(keep[:, :84], FastGenPaper().keep_mask(old, rung)[:, :84])
    # at the prompt's end (prompt_len = seq_len, or unknown) nothing is generated yet
    prompt_end = decode_view(prompt_len=100, seq_len=100)
    assert torch.equal(FastGen(recent_window=0, decode_protect=16).keep_mask(prompt_end, rung), FastGenPaper().keep_mask(prompt_end, rung))
    no_prompt_len = SlotView(prompt_end.flags, prompt_end.positions, prompt_end.scores, prompt_end.lengths,
                             prompt_end.seq_len)
    assert not bool(no_prompt_len.generated.any())


def test_young_tokens_follow_positions_on_compacted_lists():
    """On a compacted list the window is by position, not by slot: gaps are not filled."""
    view = random_view(3, heads=6, n=40)
    keep = FastGen(recent_window=5).keep_mask(view, torch.zeros(6, dtype=torch.int64))
    for h in range(6):
        seq = int(view.seq_len[h])
        for j in range(int(view.lengths[h])):
            if int(view.positions[h, j]) >= seq - 5:
                assert bool(keep[h, j])
    assert not bool((keep & ~view.valid).any())


@pytest.mark.parametrize("name, kwargs, message", [
    ("fastgen", {"recent_window": -1}, r"recent_window=-1 is invalid: allowed values are integers from 0 to 1024"),
    ("fastgen", {"recent_window": 0.3}, r"recent_window=0.3 is invalid: allowed values are integers"),
    ("fastgen", {"decode_protect": 5000}, r"decode_protect=5000 is invalid: allowed values are integers from 0"),
    ("fastgen", {"decode_protect": True}, r"decode_protect=True is invalid"),
    ("fastgen-paper", {"recent_window": 8},
     r"recent_window=8 is invalid for kv_policy='fastgen-paper': allowed value is 0"),
    ("fastgen-paper", {"decode_protect": 32}, r"decode_protect=32 is invalid for kv_policy='fastgen-paper'"),
    ("fastgen-paper", {"recovery_ratio": 2}, r"recovery_ratio=2"),
])
def test_bad_variant_values_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **kwargs)


def test_fastgen_defaults_to_a_32_token_recent_window_and_the_paper_to_none():
    """The default chosen by docs/results.md's rule (issue 15); the paper's policy keeps none."""
    assert (FastGen().recent_window, FastGen().decode_protect) == (32, 0)
    assert (FastGenPaper().recent_window, FastGenPaper().decode_protect) == (0, 0)


def test_fastgen_paper_is_fastgen_without_young_tokens():
    paper = make_policy("fastgen-paper", recovery_ratio=0.9)
    assert isinstance(paper, FastGen) and paper.name == "fastgen-paper"
    assert (paper.recent_window, paper.decode_protect) == (0, 0)
    assert (paper.local_ratio, paper.frequent_ratio) == (0.3, 0.3) and paper.chooses_per_head
    view = decode_view(prompt_len=60, seq_len=100)
    for rung in range(len(FASTGEN_LADDER)):
        choice = torch.full((3,), rung)
        assert torch.equal(paper.keep_mask(view, choice),
                           FastGen(recovery_ratio=0.9, recent_window=0, decode_protect=0).keep_mask(view, choice))
