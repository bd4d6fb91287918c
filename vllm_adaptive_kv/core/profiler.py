"""FastGen profiling: pick one hybrid per KV head from the prompt's attention.

FastGen keeps, per head, the first hybrid of the greedy ladder whose keep set
recovers at least a fraction ``T`` of the head's attention. For one query row
with probabilities ``a`` over the keys and keep set ``K``, the recovered mass is
``m = sum_{j in K} a_j``; renormalising ``a`` over ``K`` changes it by exactly
``||a - a_K||_1 = 2 (1 - m)``, so "recover T" and "attention-map error at most
2(1-T)" are the same rule. ``m`` is averaged over query rows.

GQA aggregation: one decision per KV head. The recovered mass of a KV head is
the mean over its query group's ``G`` heads and over the query rows, i.e. the
head group's pooled attention. Frequent-token scores of a KV head are likewise
summed over its ``G`` query heads (the decode kernel accumulates the same sum).

Two modes:

- window (``profile_window``): the keep set is computed once at the end of the
  prompt and judged on the last ``W`` prompt queries. Only the window's column
  sums are needed (``colsum[h, j] = sum over g, rows of a``). The runtime passes
  the slots' accumulated scores, which at the prompt's end are exactly these sums
  (``core/step.py``, ``StepScoring``); the ``window_stats`` kernel computes them
  from the paged cache in one call, ``window_statistics`` from a dense map::

      recovered[c, h] = sum_j keep_c[h, j] * colsum[h, j] / (G * W)

  Frequent scores are the window column sums (SnapKV-style).
- exact (``profile_full_map``): every prompt query row ``i`` is judged with the
  keep set the hybrid would have if the sequence ended at ``i`` (local window
  ``ceil(r_l (i+1))`` back from ``i``; frequent = top ``ceil(r_f (i+1))`` by
  attention accumulated over rows ``<= i``; FastGen's ``recent_window`` keeps the
  last ``recent_window`` tokens up to ``i`` in every compressed rung). Needs the full ``[N, N]`` map, so it
  is for short prompts, tests and analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import FLAG_PUNCT, FLAG_SPECIAL
from .policies import FastGen, SlotView, flag_mask, max_pool_slots, ratio_budget, top_k_mask


@dataclass
class Profile:
    """Result of profiling ``H`` KV heads.

    choice     [H]    int64  index into FASTGEN_LADDER
    recovered  [C, H] fp32   recovered attention mass of every rung
    keep       [H, N] bool   keep mask of the chosen rung (at the prompt's end)
    """

    choice: torch.Tensor
    recovered: torch.Tensor
    keep: torch.Tensor

    def policy_names(self) -> list[str]:
        return [FastGen.ladder[int(c)] for c in self.choice]


def first_rung_reaching(recovered: torch.Tensor, threshold: float) -> torch.Tensor:
    """Index of the first rung with ``recovered >= threshold``; the last rung (full) always qualifies.

    recovered [C, H] -> [H] int64. A tiny tolerance absorbs float rounding of sums
    that are exactly T in real arithmetic.
    """
    ok = recovered >= threshold - 1e-6
    ok[-1] = True
    return ok.to(torch.int8).argmax(dim=0)


@dataclass(frozen=True)
class FastGenProfiler:
    policy: FastGen

    def profile_window(self, view: SlotView, window_colsum: torch.Tensor, window_rows: torch.Tensor) -> Profile:
        """Choose per head from observation-window statistics.

        view           SlotView of the prompt's head lists; its ``scores`` are used
                       by the frequent component and should be ``window_colsum``.
        window_colsum  [H, N] attention summed over the group's query heads and the
                       window rows, per slot.
        window_rows    [H] number of (query head, row) pairs summed, i.e. G * W.
                       A head with no rows gets the full cache.
        """
        masks = self.policy.candidate_masks(view)  # [C, H, N]
        kept = (masks.to(torch.float32) * window_colsum.to(torch.float32)[None]).sum(-1)
        rows = window_rows.to(torch.float32)[None]
        recovered = torch.where(rows > 0, kept / rows.clamp_min(1), torch.zeros_like(kept))
        return self._decide(recovered, masks)

    def profile_full_map(self, attn: torch.Tensor, flags: torch.Tensor) -> Profile:
        """Exact mode over a full causal attention map of one prompt.

        attn  [H, G, N, N] probabilities (row i over keys 0..i; zeros above the diagonal)
        flags [N] uint8 token flags of the prompt
        """
        if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"attn must be [H, G, N, N], got {tuple(attn.shape)}")
        num_heads, group, n, _ = attn.shape
        row_masks = self._row_masks(attn, flags)  # [C, H, N, N]
        kept = torch.einsum("chij,hgij->ch", row_masks.to(attn.dtype), attn)
        recovered = (kept / (group * n)).to(torch.float32)
        end_masks = row_masks[:, :, -1, :]  # the keep set at the prompt's end
        return self._decide(recovered, end_masks)

    def _decide(self, recovered: torch.Tensor, masks: torch.Tensor) -> Profile:
        choice = first_rung_reaching(recovered, self.policy.recovery_ratio)
        keep = masks.gather(0, choice[None, :, None].expand(1, *masks.shape[1:]))[0]
        return Profile(choice=choice, recovered=recovered, keep=keep)

    def _row_masks(self, attn: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Keep masks of each rung for each query row: [C, H, N(rows), N(keys)]."""
        num_heads, _, n, _ = attn.shape
        device = attn.device
        rows = torch.arange(n, device=device)
        causal = rows[None, :] <= rows[:, None]  # [i, j]
        cur_len = rows + 1
        special = causal & flag_mask(flags.to(device), FLAG_SPECIAL)[None, :]
        punct = causal & flag_mask(flags.to(device), FLAG_PUNCT)[None, :]
        window = ratio_budget(self.policy.local_ratio, cur_len)
        local = causal & (rows[None, :] >= (cur_len - window)[:, None])
        accumulated = attn.sum(1).cumsum(dim=1)  # [H, i, j]: attention up to row i
        k = ratio_budget(self.policy.frequent_ratio, cur_len).repeat(num_heads)
        by_row = accumulated.reshape(num_heads * n, n)
        if self.policy.pool_kernel > 1:  # as Frequent: pooled over neighbours seen by row i
            by_row = max_pool_slots(by_row.masked_fill(~causal.repeat(num_heads, 1), 0), self.policy.pool_kernel)
        frequent = top_k_mask(by_row, k, causal.repeat(num_heads, 1)).reshape(num_heads, n, n)
        # FastGen's recent_window (not in the paper): the last tokens up to row i; no
        # token of a prompt is generated, so decode_protect keeps nothing here.
        recent = causal & (rows[None, :] >= (cur_len - self.policy.recent_window)[:, None])
        special = special | (recent if self.policy.recent_window else torch.zeros_like(recent))
        base = (special | punct)[None].expand(num_heads, n, n)
        rungs = [
            special[None].expand(num_heads, n, n),
            base,
            base | frequent,
            base | frequent | local[None],
            causal[None].expand(num_heads, n, n),
        ]
        return torch.stack(rungs)


def window_statistics(attn: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums of the last ``window`` rows of a dense map (reference for tests/demo).

    attn [H, G, N, N] -> (colsum [H, N], rows [H]) with rows = G * min(window, N).
    """
    num_heads, group, n, _ = attn.shape
    w = min(window, n)
    colsum = attn[:, :, n - w :, :].sum(dim=(1, 2))
    rows = torch.full((num_heads,), group * w, dtype=torch.int64, device=attn.device)
    return colsum, rows


def prompt_view(flags: torch.Tensor, scores: torch.Tensor) -> SlotView:
    """SlotView of ``H`` full (uncompressed) prompt lists: flags [N], scores [H, N]."""
    num_heads, n = scores.shape
    device = scores.device
    positions = torch.arange(n, device=device, dtype=torch.int64).expand(num_heads, n)
    full = torch.full((num_heads,), n, dtype=torch.int64, device=device)
    return SlotView(
        flags=flags.to(device).expand(num_heads, n),
        positions=positions,
        scores=scores,
        lengths=full,
        seq_len=full,
    )
