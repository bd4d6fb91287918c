"""paged_attention: attention over ragged, compacted per-(request, kv head) page lists.

Each kv head ``h`` of request ``r`` owns its own list of slots (``page_table[r, h]``,
``head_lens[r, h]``), so different heads of one request hold different tokens after
eviction. Because lists are compacted and ragged, causality is decided by ORIGINAL
positions: key slot ``s`` is visible to query ``t`` iff ``slot_pos[s] <= q_pos[t]``.

One program of the Triton kernel attends a *query tile* (up to ``BLOCK_M``
consecutive tokens of one request, all their G query heads: ``BLOCK_M * G`` query
rows) to one kv head's list, or to one *split* (a contiguous run of its pages) of it
(flash-decoding). Split partials are merged by a reduce kernel; scores, which need
every row's global softmax max and sum, are then added by a score kernel. See
``docs/kernels.md`` for the scheme.

The jit helpers here (query rows, a block's keys, block logits, softmax statistics,
normalized column sums) are shared with :mod:`.window_stats`.
"""

from __future__ import annotations

import functools
import math

import torch

from ._triton import (
    check_last_dim_contiguous,
    check_pool,
    check_power_of_two,
    check_shape,
    check_tensor,
    is_interpreted,
    tl,
    triton,
    use_triton,
)

__all__ = ["paged_attention", "paged_attention_reference", "make_query_tiles", "default_tile_tokens"]

LOG2E = math.log2(math.e)

# Bound on the elements one token chunk of the torch reference materializes
# (gathered K or V rows, fp32): keeps long prefills from gathering [T, H, S, D] at once.
_REFERENCE_CHUNK_ELEMS = 1 << 24

# Split-K (flash-decoding) choice, from host-known bounds only (see ``split_count``).
# Chosen from scripts/split_sweep.py on an H200 (Llama-3-8B decode shapes, bf16, batch
# 1-128, context 1k-32k, pages of 16): splits shorter than 32 pages cost more in launch
# and reduce than they win in parallelism, and lists over 64 pages gain from splitting.
# Over the 84 swept shapes this rule's time over each shape's best split count has a
# geometric mean of 1.15 (the first rule, 256 / 8 pages: 1.26; never splitting: 1.64).
SPLIT_MAX_PAGES = 64  # a list longer than this many pages is split (1024 slots at bs 16)
SPLIT_MIN_PAGES = 32  # ... but no split gets fewer pages than this
MAX_SPLITS = 32
SPLIT_WORKSPACE_BYTES = 128 << 20  # fp32 partials (acc, max, sum) of all programs
MAX_TILE_ROWS = 128  # query rows (tokens x G) of one tile: the M of its tl.dot
REDUCE_ROWS = 16  # rows of a tile one reduce program merges


# --------------------------------------------------------------------------- Triton


@triton.jit
def _tile_rows(tiles_ptr, stride_tiles, tile, num_tokens, row0, GROUP: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_M: tl.constexpr, TILED: tl.constexpr):
    """Query rows ``row0 .. row0 + ROWS - 1`` of tile ``tile``:
    (first token, token [ROWS], head in group [ROWS], row ok [ROWS]).

    Row i is token ``first + i // GROUP``, query head ``i % GROUP`` of the group. TILED:
    ``tiles[tile] = (first, n)`` with ``n <= BLOCK_M``; otherwise tile = token (n = 1).
    Rows past ``n * GROUP`` (padding up to ROWS, at least tl.dot's 16) are not real.
    """
    offs_r = row0 + tl.arange(0, ROWS)
    if TILED:
        first = tl.load(tiles_ptr + tile * stride_tiles).to(tl.int64)
        count = tl.load(tiles_ptr + tile * stride_tiles + 1).to(tl.int64)
        count = tl.minimum(count, BLOCK_M)
    else:
        first = tile
        count = first * 0 + 1
    count = tl.minimum(count, num_tokens - first)  # never past the last token
    row_ok = offs_r < count * GROUP
    return first, first + offs_r // GROUP, offs_r % GROUP, row_ok


@triton.jit
def _load_query_rows(q_ptr, tok, q_head, row_ok, stride_q_t, stride_q_h, head_dim,
                     BLOCK_D: tl.constexpr):
    """[ROWS, BLOCK_D] queries of (token, query head) rows; rows not ok and columns >= head_dim are 0."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    ptrs = q_ptr + tok[:, None] * stride_q_t + q_head[:, None] * stride_q_h + offs_d[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    """tl.dot with fp32 accumulation; DOT_MODE is an input_precision or "upcast".

    "upcast" multiplies fp32 copies of the operands: the Triton 3.9 interpreter's
    tl.dot multiplies bf16 operands' raw uint16 bits, so bf16 runs under the
    interpreter use it (exact products, fp32 sums: what a bf16 MMA computes).
    """
    if DOT_MODE == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_MODE)


@triton.jit
def _block_keys(table_row_ptr, stride_table_page, pos_ptr, stride_pos_page, stride_pos_slot,
                blk, num_keys, BLOCK_SIZE: tl.constexpr):
    """Page (int64) of logical block ``blk``, which of its slots are in the list, their positions."""
    offs_n = tl.arange(0, BLOCK_SIZE)
    page = tl.load(table_row_ptr + blk * stride_table_page).to(tl.int64)
    # Slots of this block still in the list; none if the page is missing (-1). Folding the
    # page test into the scalar bound also avoids the interpreter's bool-vector & bool-scalar
    # bug (it yields an int32 mask that tl.load rejects).
    keys_left = tl.where(page >= 0, num_keys - blk * BLOCK_SIZE, 0)
    in_list = offs_n < keys_left
    page = tl.maximum(page, 0)  # keep the addresses of a missing page in range
    key_pos = tl.load(pos_ptr + page * stride_pos_page + offs_n * stride_pos_slot,
                      mask=in_list, other=0)
    return page, in_list, key_pos


@triton.jit
def _visible(in_list, key_pos, q_pos):
    """[ROWS, BLOCK_SIZE]: key in the list and not after the row's query position."""
    return in_list[None, :] & (key_pos[None, :] <= q_pos[:, None])


@triton.jit
def _load_block_rows(kv_ptr, page, kind, in_list, stride_kv_page, stride_kv_kind, stride_kv_slot,
                     head_dim, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_SIZE, BLOCK_D] K (kind 0) or V (kind 1) rows of ``page``; slots not in the list are 0."""
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    base = kv_ptr + page * stride_kv_page + kind * stride_kv_kind
    ptrs = base + offs_n[:, None] * stride_kv_slot + offs_d[None, :]
    mask = in_list[:, None] & (offs_d < head_dim)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _block_logits(q, kv_ptr, page, in_list, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                  head_dim, qk_scale, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_MODE: tl.constexpr):
    """[ROWS, BLOCK_SIZE] logits in log2 units (scale * log2 e folded in); -inf if invisible."""
    k = _load_block_rows(kv_ptr, page, 0, in_list, stride_kv_page, stride_kv_kind, stride_kv_slot,
                         head_dim, BLOCK_SIZE, BLOCK_D)
    s = _dot(q, tl.trans(k), DOT_MODE) * qk_scale
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _finite_max(m):
    """Row max with -inf (nothing visible yet) replaced by 0, so exp2(x - m) never sees inf - inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _attend_blocks(q, q_pos, table_row_ptr, stride_table_page, kv_ptr, pos_ptr, num_keys, blk_lo, blk_hi,
                   stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page, stride_pos_slot,
                   head_dim, qk_scale, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr):
    """Online softmax with the V accumulation over blocks [blk_lo, blk_hi) (flash-attention style).

    Returns (row max, -inf where nothing was visible; row sum of exp2; unnormalized acc).
    """
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for blk in range(blk_lo, blk_hi):
        page, in_list, key_pos = _block_keys(table_row_ptr, stride_table_page, pos_ptr, stride_pos_page,
                                             stride_pos_slot, blk, num_keys, BLOCK_SIZE)
        visible = _visible(in_list, key_pos, q_pos)
        s = _block_logits(q, kv_ptr, page, in_list, visible, stride_kv_page, stride_kv_kind,
                          stride_kv_slot, head_dim, qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = _finite_max(m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_block_rows(kv_ptr, page, 1, in_list, stride_kv_page, stride_kv_kind, stride_kv_slot,
                             head_dim, BLOCK_SIZE, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_MODE)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _softmax_stats(q, q_pos, table_row_ptr, stride_table_page, kv_ptr, pos_ptr, num_keys,
                   stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page, stride_pos_slot,
                   head_dim, qk_scale, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr):
    """Online max and sum of exp2 over all visible keys: (finite row max, row sum), [ROWS] each."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for blk in range(0, tl.cdiv(num_keys, BLOCK_SIZE)):
        page, in_list, key_pos = _block_keys(table_row_ptr, stride_table_page, pos_ptr, stride_pos_page,
                                             stride_pos_slot, blk, num_keys, BLOCK_SIZE)
        visible = _visible(in_list, key_pos, q_pos)
        s = _block_logits(q, kv_ptr, page, in_list, visible, stride_kv_page, stride_kv_kind,
                          stride_kv_slot, head_dim, qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = _finite_max(m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    return _finite_max(m_i), l_i


@triton.jit
def _block_prob_colsum(q, kv_ptr, page, in_list, visible, m_safe, row_scale, row_ok,
                       stride_kv_page, stride_kv_kind, stride_kv_slot, head_dim, qk_scale,
                       BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr):
    """[BLOCK_SIZE] softmax probabilities of the block's keys times ``row_scale`` (1 / row sum,
    times the row's weight), summed over the real rows."""
    s = _block_logits(q, kv_ptr, page, in_list, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                      head_dim, qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)
    p = tl.exp2(s - m_safe[:, None]) * row_scale[:, None]
    p = tl.where(row_ok[:, None], p, 0.0)  # padding rows are not queries
    return tl.sum(p, 0)


@triton.jit
def _score_row_scale(inv_l, row_ok, tok, weight_ptr, WEIGHTED: tl.constexpr):
    """Per row: 1 / softmax sum, times the token's score weight; 0 for rows that are not real."""
    scale = tl.where(row_ok, inv_l, 0.0)
    if WEIGHTED:
        scale = scale * tl.load(weight_ptr + tok, mask=row_ok, other=0.0)
    return scale


@triton.jit
def _score_end(mask_ptr, req, head, stride_mask_r, stride_mask_h, row_scale, blk_lo, blk_hi,
               SCORE_MASK: tl.constexpr):
    """``blk_hi``, or ``blk_lo`` (no score pass) when the list is masked off or every row weighs 0."""
    any_row = tl.max(tl.where(row_scale != 0.0, 1, 0), 0)
    end = tl.where(any_row > 0, blk_hi, blk_lo)
    if SCORE_MASK:
        flag = tl.load(mask_ptr + req * stride_mask_r + head * stride_mask_h)
        end = tl.where(flag != 0, end, blk_lo)
    return end


@triton.jit
def _score_blocks(q, q_pos, m_safe, row_scale, row_ok, table_row_ptr, stride_table_page, kv_ptr, pos_ptr,
                  score_ptr, num_keys, blk_lo, blk_hi, stride_kv_page, stride_kv_kind, stride_kv_slot,
                  stride_pos_page, stride_pos_slot, stride_score_page, stride_score_slot,
                  head_dim, qk_scale, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_MODE: tl.constexpr):
    """Score pass over blocks [blk_lo, blk_hi): recompute the logits with the FINAL row max
    (``m_safe``) and sum (in ``row_scale``) and add the column sums to the slots' scores.
    Other tiles and programs hit the same slots, hence atomics (order is irrelevant for sums)."""
    offs_n = tl.arange(0, BLOCK_SIZE)
    for blk in range(blk_lo, blk_hi):
        page, in_list, key_pos = _block_keys(table_row_ptr, stride_table_page, pos_ptr, stride_pos_page,
                                             stride_pos_slot, blk, num_keys, BLOCK_SIZE)
        visible = _visible(in_list, key_pos, q_pos)
        col = _block_prob_colsum(q, kv_ptr, page, in_list, visible, m_safe, row_scale, row_ok,
                                 stride_kv_page, stride_kv_kind, stride_kv_slot, head_dim, qk_scale,
                                 BLOCK_SIZE, BLOCK_D, DOT_MODE)
        seen = tl.max(tl.where(visible, 1, 0), 0) > 0  # slots some row of the tile sees
        score_ptrs = score_ptr + page * stride_score_page + offs_n * stride_score_slot
        tl.atomic_add(score_ptrs, col, mask=seen, sem="relaxed")


@triton.jit
def _partial_base(part_ptr, tile, head, split, num_heads, num_splits, head_dim, RROWS: tl.constexpr):
    """Start of the fp32 partials of (tile, head, split): acc [RROWS, D], then max [RROWS], sum [RROWS]."""
    slot = (tile * num_heads + head) * num_splits + split
    return part_ptr + slot * (RROWS * (head_dim + 2))


@triton.jit
def _final_stats(stats_ptr, tile, head, num_heads, RROWS: tl.constexpr):
    """Start of the final per-row stats of (tile, head): finite max [RROWS], then 1 / sum [RROWS]."""
    return stats_ptr + (tile * num_heads + head) * (2 * RROWS)


@triton.jit
def _paged_attention_kernel(
    q_ptr, token_req_ptr, q_pos_ptr, table_ptr, head_lens_ptr, kv_ptr, pos_ptr, out_ptr, score_ptr,
    weight_ptr, mask_ptr, tiles_ptr, part_ptr,
    stride_q_t, stride_q_h, stride_out_t, stride_out_h,
    stride_table_r, stride_table_h, stride_table_page, stride_lens_r, stride_lens_h,
    stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page, stride_pos_slot,
    stride_score_page, stride_score_slot, stride_mask_r, stride_mask_h, stride_tiles,
    qk_scale, head_dim, max_pages, num_tokens, num_heads, num_splits, pages_per_split,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr, ACCUMULATE_SCORE: tl.constexpr,
    WEIGHTED: tl.constexpr, SCORE_MASK: tl.constexpr, TILED: tl.constexpr, SPLIT: tl.constexpr,
):
    """Grid (tiles, H, splits): one query tile x one kv head (its G query heads) x one split.

    Without SPLIT (one split) the program walks the whole list, writes ``out`` and, with
    ACCUMULATE_SCORE, runs the score pass itself. With SPLIT it walks pages
    ``[split * pages_per_split, ...)`` and stores its partial (max, sum, acc); the reduce
    and score kernels finish.
    """
    tile = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    first, tok, q_head, row_ok = _tile_rows(tiles_ptr, stride_tiles, tile, num_tokens, 0, GROUP, ROWS,
                                            BLOCK_M, TILED)
    q_head = head * GROUP + q_head
    req = tl.load(token_req_ptr + first).to(tl.int64)  # every token of a tile is of this request
    q_pos = tl.load(q_pos_ptr + tok, mask=row_ok, other=0)
    num_keys = tl.load(head_lens_ptr + req * stride_lens_r + head * stride_lens_h)
    num_keys = tl.minimum(num_keys, max_pages * BLOCK_SIZE)  # never read past the table row
    num_blocks = tl.cdiv(num_keys, BLOCK_SIZE)
    table_row = table_ptr + req * stride_table_r + head * stride_table_h
    q = _load_query_rows(q_ptr, tok, q_head, row_ok, stride_q_t, stride_q_h, head_dim, BLOCK_D)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)

    if SPLIT:
        split = tl.program_id(2)
        blk_lo = split * pages_per_split
        blk_hi = tl.minimum(blk_lo + pages_per_split, num_blocks)
        m_i, l_i, acc = _attend_blocks(q, q_pos, table_row, stride_table_page, kv_ptr, pos_ptr, num_keys,
                                       blk_lo, blk_hi, stride_kv_page, stride_kv_kind, stride_kv_slot,
                                       stride_pos_page, stride_pos_slot, head_dim, qk_scale, ROWS,
                                       BLOCK_SIZE, BLOCK_D, DOT_MODE)
        # Splits past the list's end store nothing: the reduce reads only the used ones.
        rows_kept = tl.where(blk_lo < num_blocks, BLOCK_M * GROUP, 0)
        keep = offs_r < rows_kept
        base = _partial_base(part_ptr, tile, head, split, num_heads, num_splits, head_dim, BLOCK_M * GROUP)
        tl.store(base + offs_r[:, None] * head_dim + offs_d[None, :], acc,
                 mask=keep[:, None] & (offs_d < head_dim)[None, :])
        stats = base + BLOCK_M * GROUP * head_dim + offs_r
        tl.store(stats, m_i, mask=keep)
        tl.store(stats + BLOCK_M * GROUP, l_i, mask=keep)
    else:
        m_i, l_i, acc = _attend_blocks(q, q_pos, table_row, stride_table_page, kv_ptr, pos_ptr, num_keys,
                                       0, num_blocks, stride_kv_page, stride_kv_kind, stride_kv_slot,
                                       stride_pos_page, stride_pos_slot, head_dim, qk_scale, ROWS,
                                       BLOCK_SIZE, BLOCK_D, DOT_MODE)
        # No visible key: l = 0 and acc = 0, so dividing by 1 writes zeros instead of NaN.
        inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
        out_ptrs = out_ptr + tok[:, None] * stride_out_t + q_head[:, None] * stride_out_h + offs_d[None, :]
        out_mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
        tl.store(out_ptrs, (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
        if ACCUMULATE_SCORE:
            row_scale = _score_row_scale(inv_l, row_ok, tok, weight_ptr, WEIGHTED)
            end = _score_end(mask_ptr, req, head, stride_mask_r, stride_mask_h, row_scale, 0, num_blocks,
                             SCORE_MASK)
            _score_blocks(q, q_pos, _finite_max(m_i), row_scale, row_ok, table_row, stride_table_page, kv_ptr,
                          pos_ptr, score_ptr, num_keys, 0, end, stride_kv_page, stride_kv_kind,
                          stride_kv_slot, stride_pos_page, stride_pos_slot, stride_score_page,
                          stride_score_slot, head_dim, qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)


@triton.jit
def _paged_attention_reduce_kernel(
    token_req_ptr, head_lens_ptr, tiles_ptr, part_ptr, stats_ptr, out_ptr,
    stride_out_t, stride_out_h, stride_lens_r, stride_lens_h, stride_tiles,
    head_dim, max_pages, num_tokens, num_heads, num_splits, pages_per_split,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr, TILED: tl.constexpr, KEEP_STATS: tl.constexpr,
):
    """Grid (tiles, H, row blocks): merge the used splits' partials of ROWS of the tile's
    rows (a block, not the whole tile: two [ROWS, D] fp32 tiles and their addresses must
    stay in registers) into ``out``.

    KEEP_STATS: also store each row's final (finite max, 1 / sum) at ``stats_ptr``, for
    the score kernel. (Not over split 0's partial: other warps of this program may still
    be reading it; Triton puts no barrier between their loads and this store.)
    """
    tile = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(2) * ROWS
    first, tok, q_head, row_ok = _tile_rows(tiles_ptr, stride_tiles, tile, num_tokens, row0, GROUP, ROWS,
                                            BLOCK_M, TILED)
    q_head = head * GROUP + q_head
    req = tl.load(token_req_ptr + first).to(tl.int64)
    num_keys = tl.load(head_lens_ptr + req * stride_lens_r + head * stride_lens_h)
    num_keys = tl.minimum(num_keys, max_pages * BLOCK_SIZE)
    used = tl.cdiv(tl.cdiv(num_keys, BLOCK_SIZE), pages_per_split)  # splits holding a block
    offs_r = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    real = offs_r < BLOCK_M * GROUP
    acc_mask = real[:, None] & (offs_d < head_dim)[None, :]
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for split in range(0, used):
        base = _partial_base(part_ptr, tile, head, split, num_heads, num_splits, head_dim, BLOCK_M * GROUP)
        stats = base + BLOCK_M * GROUP * head_dim + offs_r
        m_s = tl.load(stats, mask=real, other=float("-inf"))
        l_s = tl.load(stats + BLOCK_M * GROUP, mask=real, other=0.0)
        acc_s = tl.load(base + offs_r[:, None] * head_dim + offs_d[None, :], mask=acc_mask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = _finite_max(m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    out_ptrs = out_ptr + tok[:, None] * stride_out_t + q_head[:, None] * stride_out_h + offs_d[None, :]
    tl.store(out_ptrs, (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
    if KEEP_STATS:
        stats = _final_stats(stats_ptr, tile, head, num_heads, BLOCK_M * GROUP) + offs_r
        tl.store(stats, _finite_max(m_i), mask=real)
        tl.store(stats + BLOCK_M * GROUP, inv_l, mask=real)


@triton.jit
def _paged_score_kernel(
    q_ptr, token_req_ptr, q_pos_ptr, table_ptr, head_lens_ptr, kv_ptr, pos_ptr, score_ptr,
    weight_ptr, mask_ptr, tiles_ptr, stats_ptr,
    stride_q_t, stride_q_h,
    stride_table_r, stride_table_h, stride_table_page, stride_lens_r, stride_lens_h,
    stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page, stride_pos_slot,
    stride_score_page, stride_score_slot, stride_mask_r, stride_mask_h, stride_tiles,
    qk_scale, head_dim, max_pages, num_tokens, num_heads, num_splits, pages_per_split,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr, WEIGHTED: tl.constexpr, SCORE_MASK: tl.constexpr,
    TILED: tl.constexpr,
):
    """Grid (tiles, H, splits): the score pass of split-K, with the final max and sum the
    reduce kernel left at ``stats_ptr``. Lists masked off (or whose rows all weigh 0)
    return at once."""
    tile = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    first, tok, q_head, row_ok = _tile_rows(tiles_ptr, stride_tiles, tile, num_tokens, 0, GROUP, ROWS,
                                            BLOCK_M, TILED)
    q_head = head * GROUP + q_head
    req = tl.load(token_req_ptr + first).to(tl.int64)
    num_keys = tl.load(head_lens_ptr + req * stride_lens_r + head * stride_lens_h)
    num_keys = tl.minimum(num_keys, max_pages * BLOCK_SIZE)
    blk_lo = split * pages_per_split
    blk_hi = tl.minimum(blk_lo + pages_per_split, tl.cdiv(num_keys, BLOCK_SIZE))
    offs_r = tl.arange(0, ROWS)
    real = offs_r < BLOCK_M * GROUP
    stats = _final_stats(stats_ptr, tile, head, num_heads, BLOCK_M * GROUP) + offs_r
    m_safe = tl.load(stats, mask=real, other=0.0)
    inv_l = tl.load(stats + BLOCK_M * GROUP, mask=real, other=0.0)
    row_scale = _score_row_scale(inv_l, row_ok, tok, weight_ptr, WEIGHTED)
    end = _score_end(mask_ptr, req, head, stride_mask_r, stride_mask_h, row_scale, blk_lo, blk_hi, SCORE_MASK)
    q_pos = tl.load(q_pos_ptr + tok, mask=row_ok, other=0)
    table_row = table_ptr + req * stride_table_r + head * stride_table_h
    q = _load_query_rows(q_ptr, tok, q_head, row_ok, stride_q_t, stride_q_h, head_dim, BLOCK_D)
    _score_blocks(q, q_pos, m_safe, row_scale, row_ok, table_row, stride_table_page, kv_ptr, pos_ptr,
                  score_ptr, num_keys, blk_lo, end, stride_kv_page, stride_kv_kind, stride_kv_slot,
                  stride_pos_page, stride_pos_slot, stride_score_page, stride_score_slot, head_dim,
                  qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)


# --------------------------------------------------------------------------- host side


def check_attention_args(q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos):
    """Shared by paged_attention and window_attention_colsum; returns (T, Hq, H, G, D)."""
    _, block_size, head_dim = check_pool(kv_pages, slot_pos)
    if slot_pos is None:
        raise ValueError("slot_pos is None; attention needs the key positions for causality")
    check_power_of_two("kv_pages block_size", block_size, minimum=16)  # the tl.dot key tile
    device = kv_pages.device
    check_tensor("q", q, kv_pages.dtype, dim=3, device=device)
    check_last_dim_contiguous("q", q)
    num_tokens, num_q_heads, q_dim = q.shape
    if q_dim != head_dim:
        raise ValueError(f"q has head_dim {q_dim}; kv_pages has head_dim {head_dim}")
    check_tensor("page_table", page_table, torch.int32, dim=3, device=device)
    num_reqs, num_heads, _ = page_table.shape
    check_tensor("head_lens", head_lens, torch.int32, dim=2, device=device)
    check_shape("head_lens", head_lens, (num_reqs, num_heads))
    if num_heads == 0 or num_q_heads % num_heads:
        raise ValueError(f"q has {num_q_heads} query heads; allowed: a multiple of the "
                         f"{num_heads} kv heads of page_table")
    check_tensor("token_req", token_req, torch.int32, dim=1, device=device)
    check_shape("token_req", token_req, (num_tokens,))
    check_tensor("q_pos", q_pos, torch.int32, dim=1, device=device)
    check_shape("q_pos", q_pos, (num_tokens,))
    check_last_dim_contiguous("token_req", token_req)  # 1-D inputs are read without strides
    check_last_dim_contiguous("q_pos", q_pos)
    return num_tokens, num_q_heads, num_heads, num_q_heads // num_heads, head_dim


def dot_mode(dtype: torch.dtype, kernel) -> str:
    """fp32 pools get true fp32 dots (TF32 would lose ~3 digits); 16-bit ones the native
    MMA, except bf16 under the interpreter (see ``_dot``)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and is_interpreted(kernel):
        return "upcast"
    return "tf32"  # ignored by tl.dot for 16-bit operands


def tile_rows(tile_tokens: int, group: int) -> int:
    """Rows of a tile's tl.dot: tokens x G, padded to a power of two >= 16 (tl.dot's minimum M)."""
    return max(16, triton.next_power_of_2(tile_tokens * group))


def tile_warps(rows: int) -> int:
    """Warps of an attention program: 8 from 64 query rows up (with 4, a 64- or 128-row
    tile at D = 128 spills registers on sm_90: cuobjdump -res-usage of the cubin)."""
    return 4 if rows <= 32 else 8


def attention_launch_constants(q: torch.Tensor, group: int, head_dim: int, block_size: int,
                               kernel, tile_tokens: int = 1) -> dict:
    """Compile-time constants shared by the attention-style kernels (the window kernel
    takes GROUP_PAD, the rows of a one-token tile)."""
    return dict(
        GROUP=group,
        GROUP_PAD=tile_rows(1, group),
        BLOCK_SIZE=block_size,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_MODE=dot_mode(q.dtype, kernel),
    )


def default_tile_tokens(group: int) -> int:
    """Prefill tile size in tokens: as many as keep a tile within MAX_TILE_ROWS query rows."""
    return max(1, MAX_TILE_ROWS // max(1, group))


def make_query_tiles(num_tokens: list[int], tile_tokens: int, starts: list[int] | None = None,
                     device=None) -> torch.Tensor:
    """[NT, 2] int32 ``(first token, n)`` tiles from HOST-known per-request token counts.

    Request i owns tokens ``starts[i] .. starts[i] + num_tokens[i]`` (``starts`` defaults
    to the running sum: tokens grouped by request, in order); its tokens are cut into
    tiles of ``tile_tokens`` consecutive tokens (the last one shorter). A one-token
    request (decode) is a tile of one. Built on the host, then copied once.
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens={tile_tokens} is not supported; allowed: >= 1")
    if starts is None:
        starts, total = [], 0
        for n in num_tokens:
            starts.append(total)
            total += n
    if len(starts) != len(num_tokens):
        raise ValueError(f"starts has {len(starts)} entries; expected one per request ({len(num_tokens)})")
    tiles = [(start + j, min(tile_tokens, n - j))
             for start, n in zip(starts, num_tokens) for j in range(0, n, tile_tokens)]
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2).to(device)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (host-side properties, no sync); 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(num_programs: int, max_pages: int, rows: int, head_dim: int, device: torch.device) -> int:
    """How many splits each list gets, from host-known bounds only (never list lengths).

    ``max_pages`` is the page table's width: no list of the launch is longer. Split when a
    list may exceed SPLIT_MAX_PAGES pages (one long list would otherwise serialize a whole
    step on one program), or when the grid has fewer programs than 4 per SM; never below
    SPLIT_MIN_PAGES pages a split, above MAX_SPLITS splits, or over SPLIT_WORKSPACE_BYTES
    of partials. Tuned on an H200 (see the constants' comment).
    """
    if max_pages < 2 * SPLIT_MIN_PAGES or num_programs <= 0:
        return 1
    by_length = -(-max_pages // SPLIT_MAX_PAGES)
    by_occupancy = -(-4 * _multiprocessors(device) // num_programs)
    per_split_bytes = num_programs * rows * (head_dim + 2) * 4
    cap = min(MAX_SPLITS, max_pages // SPLIT_MIN_PAGES, max(1, SPLIT_WORKSPACE_BYTES // per_split_bytes))
    return max(1, min(cap, max(by_length, by_occupancy)))


def check_score_lists(score_lists, num_reqs: int, num_heads: int, device) -> None:
    check_tensor("score_lists", score_lists, (torch.bool, torch.uint8), dim=2, device=device)
    check_shape("score_lists", score_lists, (num_reqs, num_heads))


def paged_attention(
    q: torch.Tensor,
    token_req: torch.Tensor,
    q_pos: torch.Tensor,
    page_table: torch.Tensor,
    head_lens: torch.Tensor,
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    slot_score: torch.Tensor | None = None,
    score_weight: torch.Tensor | None = None,
    impl: str = "auto",
    k_transposed: bool = False,
    score_lists: torch.Tensor | None = None,
    query_tiles: torch.Tensor | None = None,
    tile_tokens: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal (by original position) attention over per-head page lists, with GQA.

    Args:
        q:          [T, Hq, D] queries in the pool dtype; Hq = H * G, query head ``hq``
                    reads kv head ``hq // G``.
        token_req:  [T] int32 request row (into page_table / head_lens) of each query.
        q_pos:      [T] int32 original position of each query.
        page_table: [R, H, max_pages] int32, -1 = no page (may be a strided layer view;
                    its width bounds every list and sets the split count).
        head_lens:  [R, H] int32 slots held by each list.
        kv_pages, slot_pos: the pool (``core/layout.py``).
        scale:      softmax scale (usually D ** -0.5).
        out:        optional preallocated [T, Hq, D] in q's dtype (returned).
        slot_score: optional [P, bs] fp32; every visible key slot gets += its softmax
                    probability summed over the G query heads and all T queries.
        score_weight: optional [T] fp32 (contiguous); token t's probabilities are
                    multiplied by ``score_weight[t]`` before they are added (0 leaves
                    the scores untouched, e.g. prompt rows outside an observation window).
        impl: "auto" | "triton" | "torch".
        k_transposed: K blocks stored ``[D, bs]`` (``page_views``); the torch
                    reference only, the Triton kernel reads K row by row.
        score_lists: optional [R, H] bool or uint8 (may be a strided layer view); only
                    lists ``(token_req[t], h)`` with a nonzero entry add token t's
                    probabilities (times its weight) to ``slot_score``; needs slot_score.
        query_tiles: optional [NT, 2] int32 ``(first token, n)`` (``make_query_tiles``):
                    a Triton program attends the n <= ``tile_tokens`` consecutive tokens
                    ``first .. first + n - 1``, all of ONE request, reading each list
                    once for all of them. The tiles must cover every token exactly once
                    (not checked: that would read the device). None: one token a program.
        tile_tokens: tokens per tile (the kernel's BLOCK_M), with query_tiles only.
        num_splits: pages of each list are split over this many programs (split-K);
                    None: ``split_count`` picks it from the table width and the grid.

    The last four only schedule the Triton kernels (the results are the same up to
    rounding); the torch reference honours ``score_lists`` and ignores the rest.

    Returns ``out``: softmax(scale * q.k) over visible keys times v, accumulated in fp32.
    A query that sees no key gets zeros. Decode is T = R with one token per request;
    prefill chunks may hold several tokens per request. Reads no tensor value on the
    host on the Triton path (no device synchronisation).
    """
    num_tokens, num_q_heads, num_heads, group, head_dim = check_attention_args(
        q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    check_tensor("out", out, q.dtype, dim=3, device=q.device)
    check_shape("out", out, tuple(q.shape))
    check_last_dim_contiguous("out", out)
    check_pool(kv_pages, slot_score=slot_score)
    if score_weight is not None:
        if slot_score is None:
            raise ValueError("score_weight was given without slot_score: allowed only with slot_score")
        check_tensor("score_weight", score_weight, torch.float32, dim=1, device=q.device)
        check_shape("score_weight", score_weight, (num_tokens,))
        check_last_dim_contiguous("score_weight", score_weight)
    if score_lists is not None:
        if slot_score is None:
            raise ValueError("score_lists was given without slot_score: allowed only with slot_score")
        check_score_lists(score_lists, page_table.shape[0], num_heads, q.device)
    if query_tiles is not None:
        check_tensor("query_tiles", query_tiles, torch.int32, dim=2, device=q.device)
        check_shape("query_tiles", query_tiles, (None, 2))
        check_last_dim_contiguous("query_tiles", query_tiles)
        if not isinstance(tile_tokens, int) or isinstance(tile_tokens, bool) or tile_tokens < 1:
            raise ValueError(f"tile_tokens={tile_tokens!r} is not supported with query_tiles; "
                             "allowed: an int >= 1 (the longest tile)")
        if tile_rows(tile_tokens, group) > 2 * MAX_TILE_ROWS:
            raise ValueError(f"tile_tokens={tile_tokens} gives {tile_tokens * group} query rows (G={group}); "
                             f"allowed: at most {2 * MAX_TILE_ROWS} rows ({default_tile_tokens(group)} "
                             "tokens is the default)")
    elif tile_tokens is not None:
        raise ValueError("tile_tokens was given without query_tiles: allowed only with query_tiles")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                   or num_splits < 1):
        raise ValueError(f"num_splits={num_splits!r} is not supported; allowed: None or an int >= 1")
    if k_transposed and impl == "triton":
        raise ValueError("impl='triton' needs k_transposed=False: the kernel reads K row by row")
    if k_transposed or not use_triton(impl, _paged_attention_kernel, q.device):
        return paged_attention_reference(q, token_req, q_pos, page_table, head_lens, kv_pages,
                                         slot_pos, scale, out=out, slot_score=slot_score,
                                         score_weight=score_weight, k_transposed=k_transposed,
                                         score_lists=score_lists)
    tiled = query_tiles is not None
    block_m = tile_tokens if tiled else 1
    num_tiles = query_tiles.shape[0] if tiled else num_tokens
    if num_tokens == 0 or num_tiles == 0:
        return out
    max_pages = page_table.shape[2]
    rows = tile_rows(block_m, group)
    if num_splits is None:
        num_splits = split_count(num_tiles * num_heads, max_pages, block_m * group, head_dim, q.device)
    pages_per_split = max(1, -(-max_pages // max(1, num_splits)))
    num_splits = max(1, -(-max_pages // pages_per_split))  # no split without pages
    score = slot_score if slot_score is not None else slot_pos  # dummy pointers when unused
    weight = score_weight if score_weight is not None else q_pos
    mask = score_lists if score_lists is not None else head_lens
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; kernels load bytes
    tiles = query_tiles if tiled else token_req
    stride_tiles = query_tiles.stride(0) if tiled else 0
    split = num_splits > 1
    part = stats = out  # dummy pointers when unused
    if split:  # partials (acc, max, sum) of every program, then the final (max, 1 / sum) per row
        real_rows = num_tiles * num_heads * block_m * group
        workspace = torch.empty(real_rows * (num_splits * (head_dim + 2) + 2), dtype=torch.float32,
                                device=q.device)
        part, stats = workspace.split([real_rows * num_splits * (head_dim + 2), 2 * real_rows])
    qk_scale = float(scale) * LOG2E
    consts = attention_launch_constants(q, group, head_dim, kv_pages.shape[2], _paged_attention_kernel)
    del consts["GROUP_PAD"]
    consts.update(ROWS=rows, BLOCK_M=block_m, TILED=tiled)
    num_warps = tile_warps(rows)
    flags = dict(WEIGHTED=score_weight is not None, SCORE_MASK=score_lists is not None)
    common = (qk_scale, head_dim, max_pages, num_tokens, num_heads, num_splits, pages_per_split)
    _paged_attention_kernel[(num_tiles, num_heads, num_splits)](
        q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, out, score, weight, mask, tiles, part,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        page_table.stride(0), page_table.stride(1), page_table.stride(2),
        head_lens.stride(0), head_lens.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        score.stride(0), score.stride(1), mask.stride(0), mask.stride(1), stride_tiles,
        *common, ACCUMULATE_SCORE=slot_score is not None, SPLIT=split, num_warps=num_warps, **flags, **consts,
    )
    if not split:
        return out
    no_dot = {k: v for k, v in consts.items() if k != "DOT_MODE"}
    no_dot.update(ROWS=REDUCE_ROWS)
    _paged_attention_reduce_kernel[(num_tiles, num_heads, -(-block_m * group // REDUCE_ROWS))](
        token_req, head_lens, tiles, part, stats, out,
        out.stride(0), out.stride(1), head_lens.stride(0), head_lens.stride(1), stride_tiles,
        *common[1:], KEEP_STATS=slot_score is not None, num_warps=4, **no_dot,
    )
    if slot_score is not None:
        _paged_score_kernel[(num_tiles, num_heads, num_splits)](
            q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, score, weight, mask, tiles, stats,
            q.stride(0), q.stride(1),
            page_table.stride(0), page_table.stride(1), page_table.stride(2),
            head_lens.stride(0), head_lens.stride(1),
            kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
            slot_pos.stride(0), slot_pos.stride(1),
            score.stride(0), score.stride(1), mask.stride(0), mask.stride(1), stride_tiles,
            *common, num_warps=num_warps, **flags, **consts,
        )
    return out


# --------------------------------------------------------------------------- torch reference
#
# The reference works list by list: a *list* is one (request, kv head) page list,
# ``page [N, Wb]`` its first ``Wb`` pages and ``lens [N]`` its length. Gathering
# whole pages (contiguous copies) is much cheaper than addressing slot by slot, and
# a request's list is gathered once for all of its queries of the step.
#
#     logical slot j of list n  ->  page[n, j // bs], offset j % bs
#     key j visible to query i  <=>  j < lens[n]  and  slot_pos[j] <= q_pos[n, i]
#
# ``list_probs`` and ``add_slot_scores`` are THE score rule: every attention path
# (this reference, the runtime's native CPU path; the Triton kernel computes the
# same in its second pass) accumulates ``softmax probabilities summed over the G
# query heads of the group and over the weighted queries`` into ``slot_score``.


def list_probs(q, page, lens, q_pos, kv_pages, slot_pos, scale, k_transposed=False,
               decode_logits_in_pool_dtype=False):
    """Softmax probabilities of queries over their lists' visible slots.

    q [N, t, G, D] (the t queries of list n, G query heads each), page [N, Wb] int
    (-1 = no page), lens [N], q_pos [N, t] -> (probs [N, t, G, S] fp32, page [N, Wb]
    int64 clamped), S = Wb * bs. A query that sees no key gets all-zero probabilities.

    Logits come from float32 operands, except with ``decode_logits_in_pool_dtype``
    for one-query lists (callers set it for decode tokens only): those multiply in the pool's dtype (float32
    accumulation inside each dot product, the result rounded to that dtype), which
    spares a float32 copy of every gathered K block, the dominant cost of CPU decode
    scoring. The runtime's CPU paths both set it, so they decide alike; as an oracle
    for the kernels it stays off. The softmax is float32 either way, and in a
    float32 pool both are the same.
    """
    num_lists, t, group, head_dim = q.shape
    page = page.long().clamp_min(0)
    width = page.shape[1]
    blocks = kv_pages[:, 0][page]  # [N, Wb, bs, D] raw K blocks, as stored
    # K^T per page without a transposing copy when the pool stores K as [D, bs].
    keys_t = blocks.view(num_lists, width, head_dim, -1) if k_transposed else blocks.transpose(-1, -2)
    dtype = kv_pages.dtype if decode_logits_in_pool_dtype and t == 1 else torch.float32
    qg = q.reshape(num_lists, 1, t * group, head_dim).to(dtype)
    logits = torch.matmul(qg, keys_t.to(dtype)).float()  # [N, Wb, t*G, bs]
    logits = logits.transpose(1, 2).reshape(num_lists, t, group, -1)
    key_pos = slot_pos[page].reshape(num_lists, -1)  # [N, S]
    slots = torch.arange(key_pos.shape[1], device=q.device)
    visible = (slots < lens.long()[:, None])[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])  # [N,t,S]
    logits.mul_(scale).masked_fill_(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # all-masked rows -> 0
    return probs, page


def add_slot_scores(slot_score, probs, page, weight=None):
    """slot_score[slot] += probabilities summed over the group and the weighted queries.

    probs [N, t, G, S] from ``list_probs``, page [N, Wb] int64, weight [N, t] or None (1).
    Invisible slots carry exact zeros, so clamped padding pages are left unchanged.
    """
    col = probs.sum(2)  # [N, t, S]
    col = (col * weight[..., None]).sum(1) if weight is not None else col.sum(1)
    block_size = slot_score.shape[1]
    offs = torch.arange(block_size, device=page.device)
    slot_ids = (page[..., None] * block_size + offs).reshape(-1)
    slot_score.view(-1).index_put_((slot_ids,), col.reshape(-1).to(slot_score.dtype), accumulate=True)


def list_attention(q, page, lens, q_pos, kv_pages, slot_pos, scale, k_transposed=False,
                   decode_logits_in_pool_dtype=False):
    """Attention of list queries: q [N, t, G, D] -> (out [N, t, G, D] fp32, probs, page)."""
    probs, page = list_probs(q, page, lens, q_pos, kv_pages, slot_pos, scale, k_transposed,
                             decode_logits_in_pool_dtype)
    num_lists, _, _, head_dim = q.shape
    values = kv_pages[:, 1][page].reshape(num_lists, -1, head_dim).float()  # [N, S, D]
    visible_any = probs.sum((1, 2)) > 0  # unlisted slots may hold NaN / Inf: zero them
    values = values.masked_fill(~visible_any[..., None], 0.0)
    out = torch.einsum("ntgs,nsd->ntgd", probs, values)
    return out, probs, page


def token_chunks(num_tokens: int, elems_per_token: int):
    """Slices of query tokens whose gathered rows stay under _REFERENCE_CHUNK_ELEMS."""
    step = max(1, _REFERENCE_CHUNK_ELEMS // max(1, elems_per_token))
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def token_batches(token_req: torch.Tensor, page_table: torch.Tensor, block_size: int, head_dim: int):
    """``(tokens [R, t], one_token_runs)`` of request batches, each within the chunk bound.

    Runs of consecutive tokens of one request are found with a host read of
    ``token_req``: one-token runs (decode) are batched together, each longer run
    (a prefill chunk) goes alone, split over its tokens. Attention of a token depends
    only on its own query and list, so any such split gives the same result.
    """
    if token_req.numel() == 0:
        return
    _, counts = torch.unique_consecutive(token_req, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    device = token_req.device
    single = counts == 1
    per_list = page_table.shape[1] * page_table.shape[2] * block_size * head_dim
    batch = max(1, _REFERENCE_CHUNK_ELEMS // max(1, per_list))
    singles = starts[single].to(device)
    for lo in range(0, singles.numel(), batch):
        yield singles[lo:lo + batch, None], True
    for start, n in zip(starts[~single].tolist(), counts[~single].tolist()):
        for chunk in token_chunks(n, per_list // head_dim):
            yield torch.arange(start + chunk.start, start + chunk.stop, device=device)[None, :], False


def batch_lists(tokens, q, token_req, q_pos, page_table, head_lens, block_size):
    """The lists and queries of the requests of ``tokens [R, t]``, flattened to N = R * H.

    -> (q [N, t, G, D], page [N, Wb], lens [N], q_pos [N, t], rows [R] int64); Wb is
    the batch's own widest list, in pages (a host read).
    """
    num_reqs, t = tokens.shape
    num_q_heads, head_dim = q.shape[1:]
    num_heads = page_table.shape[1]
    rows = token_req[tokens[:, 0]].long()
    lens = head_lens[rows].reshape(-1)
    width = max(1, -(-int(lens.max()) // block_size))
    page = page_table[rows, :, :width].reshape(num_reqs * num_heads, width)
    ql = q[tokens].view(num_reqs, t, num_heads, num_q_heads // num_heads, head_dim).transpose(1, 2)
    pos = q_pos[tokens].long().repeat_interleave(num_heads, dim=0)
    return ql.reshape(num_reqs * num_heads, t, -1, head_dim), page, lens, pos, rows


def _attend_batch(tokens, q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, scale, out,
                  slot_score, score_weight, k_transposed, decode_logits_in_pool_dtype, score_lists=None):
    """Attention (and scores) of the requests of ``tokens [R, t]`` in one batch."""
    num_reqs, t = tokens.shape
    num_q_heads, head_dim = q.shape[1:]
    ql, page, lens, pos, rows = batch_lists(tokens, q, token_req, q_pos, page_table, head_lens, kv_pages.shape[2])
    attn, probs, page = list_attention(ql, page, lens, pos, kv_pages, slot_pos, scale, k_transposed,
                                       decode_logits_in_pool_dtype)
    attn = attn.view(num_reqs, -1, t, attn.shape[2], head_dim).transpose(1, 2)
    out[tokens] = attn.reshape(num_reqs, t, num_q_heads, head_dim).to(out.dtype)
    if slot_score is not None:
        weight = None
        if score_weight is not None:
            weight = score_weight[tokens].repeat_interleave(page_table.shape[1], dim=0)
        if score_lists is not None:  # lists masked off add exact zeros
            listed = score_lists[rows].reshape(-1, 1).to(torch.float32)  # [N, 1], N = R * H
            weight = listed.expand(-1, t) if weight is None else weight * listed
        add_slot_scores(slot_score, probs, page, weight)


def paged_attention_reference(
    q: torch.Tensor,
    token_req: torch.Tensor,
    q_pos: torch.Tensor,
    page_table: torch.Tensor,
    head_lens: torch.Tensor,
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    slot_score: torch.Tensor | None = None,
    score_weight: torch.Tensor | None = None,
    k_transposed: bool = False,
    decode_logits_in_pool_dtype: bool = False,
    score_lists: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch version of :func:`paged_attention` (same arguments, minus ``impl`` and the
    Triton-only schedule: ``query_tiles``, ``tile_tokens``, ``num_splits``).

    Also the runtime's torch attention path, so it reads both K layouts
    (``k_transposed``) and takes ``list_probs``'s precision switch
    (``decode_logits_in_pool_dtype``). One-token requests (decode) run as one batch; each longer
    run of one request's tokens (a prefill chunk) gathers its lists once and is
    split over its tokens so the probabilities stay bounded. Reads ``token_req``
    and the lengths on the host (it is a reference and a CPU path). ``score_lists``
    [R, H] multiplies each list's weights by 0 or 1 (masked-off lists add zeros).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for tokens, one_token_runs in token_batches(token_req, page_table, kv_pages.shape[2], q.shape[2]):
        # Only one-token requests are decode rows; a one-token piece of a split chunk is not.
        _attend_batch(tokens, q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, scale, out,
                      slot_score, score_weight, k_transposed, decode_logits_in_pool_dtype and one_token_runs,
                      score_lists)
    return out
