"""The profiler against a brute-force FastGen criterion, and on maps with a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive_kv.core.layout import FLAG_PUNCT, FLAG_SPECIAL
from vllm_adaptive_kv.core.policies import FASTGEN_LADDER, FastGen, FastGenPaper
from vllm_adaptive_kv.core.profiler import FastGenProfiler, prompt_view, window_statistics


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    n = logits.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def random_maps(seed: int, heads: int, group: int, n: int, sharpness: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return causal_softmax(torch.randn(heads, group, n, n, generator=gen, dtype=torch.float64) * sharpness)


def random_flags(seed: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    flags = (torch.rand(n, generator=gen) < 0.15).to(torch.uint8) * FLAG_PUNCT
    flags[0] = FLAG_SPECIAL
    return flags


# --- brute force, one element at a time ----------------------------------------


def brute_rung_keep(rung: str, i: int, scores_upto_i: list[float], flags: torch.Tensor, policy: FastGen) -> set[int]:
    """Keys kept by ``rung`` when the sequence ends at row ``i`` (length i+1)."""
    length = i + 1
    keys = range(length)
    if rung == "full":
        return set(keys)
    keep = {j for j in keys if flags[j] & FLAG_SPECIAL}
    keep |= {j for j in keys if j >= length - policy.recent_window}  # not in the paper; 0 there
    if "punct" in rung:
        keep |= {j for j in keys if flags[j] & FLAG_PUNCT}
    if "frequent" in rung:
        k = math.ceil(policy.frequent_ratio * length - 1e-9)
        r = policy.pool_kernel // 2  # ranked by the largest score within r slots
        pooled = [max(scores_upto_i[max(0, j - r): min(length, j + r + 1)]) for j in keys]
        keep |= set(sorted(keys, key=lambda j: (-pooled[j], j))[:k])
    if "local" in rung:
        window = math.ceil(policy.local_ratio * length - 1e-9)
        keep |= {j for j in keys if j >= length - window}
    return keep


def brute_full_map(attn: torch.Tensor, flags: torch.Tensor, policy: FastGen):
    heads, group, n, _ = attn.shape
    recovered = torch.zeros(len(FASTGEN_LADDER), heads, dtype=torch.float64)
    for h in range(heads):
        for i in range(n):
            scores = [float(attn[h, :, : i + 1, j].sum()) for j in range(n)]
            for c, rung in enumerate(FASTGEN_LADDER):
                kept = brute_rung_keep(rung, i, scores, flags, policy)
                for g in range(group):
                    recovered[c, h] += sum(float(attn[h, g, i, j]) for j in kept)
    recovered /= group * n
    return recovered, brute_choice(recovered, policy.recovery_ratio)


def brute_window(attn: torch.Tensor, flags: torch.Tensor, policy: FastGen, window: int):
    heads, group, n, _ = attn.shape
    rows = range(n - window, n)
    recovered = torch.zeros(len(FASTGEN_LADDER), heads, dtype=torch.float64)
    for h in range(heads):
        scores = [float(attn[h, :, n - window :, j].sum()) for j in range(n)]
        for c, rung in enumerate(FASTGEN_LADDER):
            kept = brute_rung_keep(rung, n - 1, scores, flags, policy)
            mass = sum(float(attn[h, g, i, j]) for g in range(group) for i in rows for j in kept)
            recovered[c, h] = mass / (group * window)
    return recovered, brute_choice(recovered, policy.recovery_ratio)


def brute_choice(recovered: torch.Tensor, threshold: float) -> list[int]:
    out = []
    for h in range(recovered.shape[1]):
        c = next((c for c in range(recovered.shape[0]) if recovered[c, h] >= threshold - 1e-6), len(FASTGEN_LADDER) - 1)
        out.append(c)
    return out


# --- tests ---------------------------------------------------------------------


@pytest.mark.parametrize("recent, pool", [(0, 1), (3, 1), (0, 3), (3, 5)])
@pytest.mark.parametrize("seed, heads, group, n, threshold", [(0, 3, 3, 12, 0.6), (1, 2, 1, 17, 0.8), (2, 2, 4, 9, 0.5), (3, 4, 2, 14, 0.95)])
def test_full_map_mode_matches_brute_force(seed, heads, group, n, threshold, recent, pool):
    attn = random_maps(seed, heads, group, n)
    flags = random_flags(seed, n)
    policy = FastGen(recovery_ratio=threshold, local_ratio=0.3, frequent_ratio=0.3, recent_window=recent,
                     pool_kernel=pool)
    profile = FastGenProfiler(policy).profile_full_map(attn, flags)
    want_recovered, want_choice = brute_full_map(attn, flags, policy)
    torch.testing.assert_close(profile.recovered.double(), want_recovered, atol=1e-5, rtol=0)
    assert profile.choice.tolist() == want_choice


@pytest.mark.parametrize("recent, pool", [(0, 1), (4, 1), (0, 3), (4, 7)])
@pytest.mark.parametrize("seed, heads, group, n, window, threshold", [(4, 3, 3, 20, 6, 0.7), (5, 2, 8, 16, 16, 0.9), (6, 3, 1, 25, 1, 0.5)])
def test_window_mode_matches_brute_force(seed, heads, group, n, window, threshold, recent, pool):
    attn = random_maps(seed, heads, group, n)
    flags = random_flags(seed, n)
    policy = FastGen(recovery_ratio=threshold, recent_window=recent, decode_protect=8,  # nothing generated yet
                     pool_kernel=pool)
    colsum, rows = window_statistics(attn, window)
    profile = FastGenProfiler(policy).profile_window(prompt_view(flags, colsum.float()), colsum, rows)
    want_recovered, want_choice = brute_window(attn, flags, policy, window)
    torch.testing.assert_close(profile.recovered.double(), want_recovered, atol=1e-5, rtol=0)
    assert profile.choice.tolist() == want_choice


def structured_maps(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Three KV heads with a known right policy: sink, punctuation, local band.

    Token 0 is special (BOS); every 8th token is punctuation.
    """
    flags = torch.zeros(n, dtype=torch.uint8)
    flags[0] = FLAG_SPECIAL
    flags[8::8] = FLAG_PUNCT
    rows = torch.arange(n)
    causal = rows[None, :] <= rows[:, None]
    sink = torch.full((n, n), -30.0).masked_fill(torch.zeros(n, n, dtype=torch.bool).index_fill(1, torch.tensor([0]), True), 10.0)
    is_punct_or_bos = (flags != 0)[None, :].expand(n, n)
    punct = torch.where(is_punct_or_bos, 10.0, -30.0)
    band = (rows[:, None] - rows[None, :]).abs() <= 1
    local = torch.where(band, 10.0, -30.0)
    logits = torch.stack([sink, punct, local]).masked_fill(~causal, float("-inf"))
    attn = torch.softmax(logits.double(), dim=-1)[:, None]  # [3, 1, n, n]
    return attn, flags


def test_structured_heads_get_their_known_policy_exact_mode():
    attn, flags = structured_maps()
    profile = FastGenProfiler(FastGenPaper(recovery_ratio=0.95)).profile_full_map(attn, flags)
    assert profile.policy_names() == ["special", "special+punct", "special+punct+frequent+local"]


def test_structured_heads_get_their_known_policy_window_mode():
    """In window mode frequent scores come from the window itself, so a narrow
    local band is captured by ``frequent`` unless its budget is tiny."""
    attn, flags = structured_maps()
    policy = FastGenPaper(recovery_ratio=0.95, frequent_ratio=0.0)
    colsum, rows = window_statistics(attn, 16)
    profile = FastGenProfiler(policy).profile_window(prompt_view(flags, colsum.float()), colsum, rows)
    assert profile.policy_names() == ["special", "special+punct", "special+punct+frequent+local"]
    default = FastGenPaper(recovery_ratio=0.95)
    profile = FastGenProfiler(default).profile_window(prompt_view(flags, colsum.float()), colsum, rows)
    assert profile.policy_names()[2] == "special+punct+frequent"


def test_gqa_decision_uses_the_mean_of_the_group():
    """A KV head whose two query heads are a sink head and a uniform head: the group
    mean of recovered mass (not the max or the min) decides."""
    n = 40
    flags = torch.zeros(n, dtype=torch.uint8)
    flags[0] = FLAG_SPECIAL
    attn, _ = structured_maps(n)
    sink = attn[0, 0]
    uniform = causal_softmax(torch.zeros(n, n, dtype=torch.float64))
    grouped = torch.stack([sink, uniform])[None]  # [1, G=2, n, n]
    policy = FastGen(recovery_ratio=0.5, recent_window=0)  # the special rung alone, no young tokens
    profile = FastGenProfiler(policy).profile_full_map(grouped, flags)
    special_mass = (sink[:, 0].mean() + uniform[:, 0].mean()) / 2
    torch.testing.assert_close(profile.recovered[0, 0].double(), special_mass, atol=1e-6, rtol=0)
    assert 0.5 < float(special_mass) < 0.99
    assert profile.policy_names() == ["special"]


def test_profile_keep_mask_is_the_chosen_rung_at_the_prompt_end():
    attn, flags = structured_maps()
    profile = FastGenProfiler(FastGenPaper(recovery_ratio=0.95)).profile_full_map(attn, flags)
    assert profile.keep[0].nonzero().flatten().tolist() == [0]
    assert profile.keep[1].nonzero().flatten().tolist() == [0] + list(range(8, 64, 8))


def test_head_without_window_rows_keeps_everything():
    flags = torch.zeros(5, dtype=torch.uint8)
    colsum = torch.zeros(1, 5)
    profile = FastGenProfiler(FastGen()).profile_window(prompt_view(flags, colsum), colsum, torch.zeros(1))
    assert profile.policy_names() == ["full"]
