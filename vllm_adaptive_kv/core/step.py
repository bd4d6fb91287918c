"""Boundary objects of one engine step: what the runtime plans, and what it reports.

Planned by ``HeadCacheRuntime.plan_step`` once per step and read by every layer::

    StepMetadata
      requests   StepRequests   host facts: ids, page-table rows, token counts
      tokens     StepTokens     per-token device tensors: rows, positions, flags, slots
      scoring    StepScoring    which queries add to the slots' attention scores
      path       (any)          the attention path's own plan (``AttentionPath.plan``)

Reported by ``HeadCacheRuntime.finish_step`` and carried, unchanged in shape, from
every worker rank through the KV connector to the scheduler's block manager::

    StepReport.requests[req_id] = RequestReport(pages_held, full_lists, slots_held, tokens)

Token order: the step's ``T`` tokens are grouped by request, in ``requests.req_ids``
order; request ``i`` owns tokens ``starts[i] .. starts[i] + num_tokens[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepRequests:
    """Host-side facts of the step's R requests (no device read needed)."""

    req_ids: list[str]
    rows: list[int]  # page-table row of each request
    rows_t: torch.Tensor  # [R] int64, the same rows on the pool's device
    num_tokens: list[int]  # new tokens of each request this step
    starts: list[int]  # index of each request's first token in the step
    width: int  # page-table columns any list of the step can use (host bound)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


@dataclass
class StepTokens:
    """Device tensors of the step's T tokens, shared by every layer.

    token_row     [T] int32        page-table row of each token's request
    positions     [T] int32        original positions
    flags         [T] uint8        token-class bits (FLAG_SPECIAL | FLAG_PUNCT)
    slot_mapping  [L, T, H] int64  physical slot of token t in list (row, l, h)
    """

    token_row: torch.Tensor
    positions: torch.Tensor
    flags: torch.Tensor
    slot_mapping: torch.Tensor


@dataclass
class StepScoring:
    """Which queries of the step add their attention to the slots' scores.

    The rule (``triton_kernels.paged_attention.list_probs`` / ``add_slot_scores``):
    a slot's score gains the softmax probability it receives, summed over the
    query heads of its group, from every *observation row* of a scoring request
    (prompt positions ``>= prompt_len - observation_window`` and every later token;
    with ``compress_by_chunk`` also a chunk's last rows, ``RowState.observation_start``).

    weight        [T] fp32   1 for observation rows, 0 elsewhere (dense paths)
    lists         [max_reqs, L, H] bool, the runtime's persistent per-list mask
                  (``HeadCacheRuntime.score_lists``): only lists with True add their
                  rows' attention (dense paths pass the ``[:, layer]`` view)
    decode_lists  per layer: (token [N], row [N], head [N]) int64 of one-token
                  requests whose list at that layer accumulates, or None. Filled
                  only for paths that score list by list (``scores_by_list``).
    spans         (row, start, end) observation rows of multi-token requests
    """

    weight: torch.Tensor
    lists: torch.Tensor | None = None
    decode_lists: list | None = None
    spans: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class StepMetadata:
    """Everything a layer needs to attend in this step (see the module docstring)."""

    requests: StepRequests
    tokens: StepTokens
    scoring: StepScoring | None  # None: no request of the step accumulates scores
    path: Any = None


@dataclass
class RequestReport:
    """What one request holds after a step, as the scheduler needs it.

    Under tensor parallelism each rank reports its own heads; ``merge`` combines two
    ranks: pages and full lists take the fuller rank (the scheduler must fit it),
    slots add up, tokens are the same on every rank.
    """

    pages_held: int  # head pages held over all of the rank's lists
    full_lists: int  # lists whose last page is full (or empty): the next token opens a page
    slots_held: int  # token slots held, summed over lists
    tokens: int  # tokens written to the request's lists so far (before eviction)

    def merge(self, other: "RequestReport") -> "RequestReport":
        return RequestReport(max(self.pages_held, other.pages_held), max(self.full_lists, other.full_lists),
                             self.slots_held + other.slots_held, max(self.tokens, other.tokens))


@dataclass
class StepReport:
    """What the scheduler needs after a step; plain Python values (picklable).

    requests: req_id -> RequestReport of every request of the step
    timings: seconds per part (``core.timing``), empty unless timing is on
    """

    requests: dict[str, RequestReport] = field(default_factory=dict)
    evicted_tokens: int = 0
    head_policy_counts: dict[str, int] = field(default_factory=dict)
    pages_free: int = 0
    timings: dict[str, float] = field(default_factory=dict)
