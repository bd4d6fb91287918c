"""Attention paths: one small class per way of attending over the head lists.

The runtime owns the bookkeeping (``core/runtime.py``); a path only turns one
layer's queries into outputs over the lists the runtime planned, and adds the
observation rows' attention to the slot scores by the one score rule
(``triton_kernels.paged_attention.list_probs`` / ``add_slot_scores``). The worker
picks the path once, at start-up, and the pool is laid out for it::

    path              device  K layout     write/compact   scores
    TorchAttention    any     [bs, D] or   torch           inside the reference
                              [D, bs]
    TritonAttention   CUDA /  [bs, D]      Triton          inside the kernel
                      interp.
    NativeCpuAttention CPU    [D, bs]      C++ write,      decode: inside our C++ kernel;
                                           torch compact   prefill rows: ``score_lists``
    (plugin/cpu/attention.py: vLLM's CPU kernel, which returns no probabilities, over
    the lists that do not score; without the C++ kernels (``cpu_kernels``) it attends
    every list, writes in torch and scores list by list with ``score_lists``)

Every path gets the same ``StepMetadata`` (``core/step.py``); a path that needs
extra per-step tensors builds them once per step in ``plan``; it writes the step's
K/V with ``write_kv`` and applies compaction plans with ``compact`` (the Triton or torch
kernels by ``kernel_impl`` by default). The dense paths pass
the runtime's per-list score mask (``StepScoring.lists``) so that only lists whose
policy reads scores accumulate them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..triton_kernels.paged_attention import (
    add_slot_scores,
    default_tile_tokens,
    list_probs,
    make_query_tiles,
    paged_attention,
    paged_attention_reference,
)
from ..triton_kernels.compaction import compact_slots
from ..triton_kernels.write_kv import write_kv
from .layout import KVPool
from .paging import PagedHeadCache
from .step import StepMetadata
from .timing import StepTimer


class AttentionPath:
    """The interface: bind once, then ``plan`` per step and ``attend`` per layer."""

    name: ClassVar[str] = "abstract"
    k_transposed: ClassVar[bool] = False  # K blocks stored [D, bs] (the pool is built to match)
    kernel_impl: ClassVar[str] = "torch"  # implementation of write_kv and compaction
    scores_by_list: ClassVar[bool] = False  # wants StepScoring.decode_lists / spans

    pool: KVPool
    cache: PagedHeadCache
    timer: StepTimer = StepTimer()  # disabled; the worker swaps in its own when timing is on
    query_group: int = 1  # query heads per kv head

    def bind(self, pool: KVPool, cache: PagedHeadCache, query_group: int = 1) -> None:
        """Once, by the runtime: the pool and page tables this path reads."""
        if pool.k_transposed != self.k_transposed:
            raise ValueError(f"attention path {self.name!r} reads K stored "
                             f"{'[D, bs]' if self.k_transposed else '[bs, D]'}: build the pool with "
                             f"k_transposed={self.k_transposed}")
        self.pool, self.cache, self.query_group = pool, cache, query_group

    def plan(self, meta: StepMetadata) -> Any:
        """Per-step tensors of this path (None: it needs none)."""
        return None

    def compact(self, plan) -> None:
        """Apply a ``CompactionPlan``'s slot moves to the pool (``compact_slots``, ``kernel_impl``)."""
        pool = self.pool
        compact_slots(pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score, plan.src_slot, plan.dst_slot,
                      plan.num_moves, impl=self.kernel_impl, k_transposed=pool.k_transposed)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: StepMetadata) -> None:
        """k / v [T, H, D] of ``layer`` into the slots the step allocated (``write_kv``, ``kernel_impl``)."""
        pool, tokens = self.pool, meta.tokens
        write_kv(k, v, tokens.slot_mapping[layer], tokens.positions, tokens.flags, pool.kv_pages, pool.slot_pos,
                 pool.slot_flags, pool.slot_score, impl=self.kernel_impl, k_transposed=pool.k_transposed)

    def attend(self, layer: int, q: torch.Tensor, out: torch.Tensor, meta: StepMetadata,
               scale: float) -> None:
        """q [T, Hq, D] -> out [T, Hq, D]; K/V of the step are already in the lists."""
        raise NotImplementedError


class TorchAttention(AttentionPath):
    """The kernels' own torch reference over the lists (any device, both K layouts).

    Decode logits in the pool's dtype, as the native CPU path scores them, so the
    two CPU paths make the same eviction decisions (``list_probs``).
    """

    name = "torch"

    def __init__(self, k_transposed: bool = False) -> None:
        self.k_transposed = k_transposed  # instance override: the reference reads both

    def attend(self, layer, q, out, meta, scale) -> None:
        pool, scoring, tokens = self.pool, meta.scoring, meta.tokens
        paged_attention_reference(q, tokens.token_row, tokens.positions, self.cache.table[:, layer],
                                  self.cache.lens[:, layer], pool.kv_pages, pool.slot_pos, scale, out=out,
                                  slot_score=pool.slot_score if scoring is not None else None,
                                  score_weight=scoring.weight if scoring is not None else None,
                                  k_transposed=pool.k_transposed, decode_logits_in_pool_dtype=True,
                                  score_lists=layer_score_lists(scoring, layer))


def layer_score_lists(scoring, layer: int) -> torch.Tensor | None:
    """[max_reqs, H] view of the runtime's per-list score mask at ``layer`` (None: all lists)."""
    if scoring is None or scoring.lists is None:
        return None
    return scoring.lists[:, layer]


@dataclass
class TritonPlan:
    """Per-step schedule of the Triton kernels, from host-known counts only.

    query_tiles  [NT, 2] int32 (first token, n) tiles of ``tile_tokens`` consecutive
                 tokens of one request; None when every request has one token (decode:
                 one program per token)
    width        page-table columns any list of the step can use: the table view the
                 kernel gets, so the split-K choice follows the step's longest list
    """

    query_tiles: torch.Tensor | None
    tile_tokens: int | None
    width: int


class TritonAttention(AttentionPath):
    """The Triton kernels (CUDA, or the interpreter on CPU tensors).

    ``plan`` cuts prefill chunks into query tiles on the host; ``attend`` reads no
    device value (no host synchronisation): every bound it passes is host-known.
    """

    name = "triton"
    kernel_impl = "triton"

    def plan(self, meta: StepMetadata) -> TritonPlan:
        requests = meta.requests
        tiles = tile_tokens = None
        if max(requests.num_tokens, default=0) > 1:
            tile_tokens = default_tile_tokens(self.query_group)
            tiles = make_query_tiles(requests.num_tokens, tile_tokens, requests.starts, device=self.cache.device)
        return TritonPlan(tiles, tile_tokens, max(1, requests.width))

    def attend(self, layer, q, out, meta, scale) -> None:
        pool, scoring, tokens, plan = self.pool, meta.scoring, meta.tokens, meta.path
        paged_attention(q, tokens.token_row, tokens.positions, self.cache.table[:, layer, :, :plan.width],
                        self.cache.lens[:, layer], pool.kv_pages, pool.slot_pos, scale, out=out,
                        slot_score=pool.slot_score if scoring is not None else None,
                        score_weight=scoring.weight if scoring is not None else None, impl="triton",
                        score_lists=layer_score_lists(scoring, layer), query_tiles=plan.query_tiles,
                        tile_tokens=plan.tile_tokens)


ATTENTION_PATHS = {"torch": TorchAttention, "triton": TritonAttention}


def attention_path(name: str) -> AttentionPath:
    """A core path by name (the vLLM CPU kernel path lives in the plugin)."""
    if name not in ATTENTION_PATHS:
        raise ValueError(f"attention path {name!r} is unknown: allowed values are {', '.join(ATTENTION_PATHS)}")
    return ATTENTION_PATHS[name]()


def score_lists(pool: KVPool, cache: PagedHeadCache, layer: int, q: torch.Tensor, meta: StepMetadata,
                scale: float) -> None:
    """Scores of the step's observation rows at ``layer``, list by list.

    For paths whose attention returns no probabilities (the native CPU path without its
    C++ kernels, which score inside ``scored_decode_attention`` / ``score_rows``). Decode lists gather only
    their own width (scored lists are compressed ones, often far shorter than the
    step's longest; a host read, free on CPU where this runs). Logit precision
    follows ``list_probs``, like the torch reference, so both paths decide alike.
    """
    scoring = meta.scoring
    num_tokens, _, head_dim = q.shape
    num_heads = cache.lens.shape[2]
    by_head = q.view(num_tokens, num_heads, -1, head_dim)
    positions = meta.tokens.positions.long()
    width = max(meta.requests.width, 1)
    if scoring.decode_lists[layer] is not None:
        token, row, head = scoring.decode_lists[layer]
        lens = cache.lens[row, layer, head]
        own = max(1, -(-int(lens.max()) // pool.block_size))
        page = cache.table[row, layer, head, :min(width, own)]
        probs, page = list_probs(by_head[token, head][:, None], page, lens, positions[token][:, None],
                                 pool.kv_pages, pool.slot_pos, scale, pool.k_transposed,
                                 decode_logits_in_pool_dtype=True)
        add_slot_scores(pool.slot_score, probs, page)
    for row, start, end in scoring.spans:
        span_q = by_head[start:end].transpose(0, 1)  # [H, t, G, D]
        span_pos = positions[start:end][None, :].expand(num_heads, -1)
        probs, page = list_probs(span_q, cache.table[row, layer, :, :width], cache.lens[row, layer], span_pos,
                                 pool.kv_pages, pool.slot_pos, scale, pool.k_transposed)
        add_slot_scores(pool.slot_score, probs, page)
