"""window_stats: attention column sums of the observation window, for the profiler.

FastGen profiles each head on the attention the last ``W`` prompt queries pay to
every cached key. This kernel returns, per list (r, h) and LOGICAL slot i, the
softmax probability of slot i summed over the window queries of r and the G query
heads of group h. Causality follows :mod:`.paged_attention` (original positions).

The runtime does not call it: there the same sums are the slots' scores at the
prompt's end, added by the attention paths as the window rows are computed. The
kernel is exercised by the tests and ``scripts/bench_kernels.py``.
"""

from __future__ import annotations

import torch

from ._triton import check_shape, check_tensor, tl, triton, use_triton
from .paged_attention import (
    LOG2E,
    _block_keys,
    _block_prob_colsum,
    _load_query_rows,
    _softmax_stats,
    _visible,
    attention_launch_constants,
    check_attention_args,
    batch_lists,
    list_probs,
    token_batches,
)

__all__ = ["window_attention_colsum", "window_attention_colsum_reference"]


@triton.jit
def _window_colsum_kernel(
    q_ptr, token_req_ptr, q_pos_ptr, table_ptr, head_lens_ptr, kv_ptr, pos_ptr, out_ptr,
    stride_q_t, stride_q_h,
    stride_table_r, stride_table_h, stride_table_page, stride_lens_r, stride_lens_h,
    stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page, stride_pos_slot,
    stride_out_r, stride_out_h, stride_out_slot,
    qk_scale, head_dim, max_pages,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Grid (T, H): pass 1 finds the softmax max/sum, pass 2 adds normalized probabilities.

    All window tokens of a request add into the same out row, hence atomics.
    """
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    req = tl.load(token_req_ptr + tok).to(tl.int64)
    offs_g = tl.arange(0, GROUP_PAD)
    group_mask = offs_g < GROUP  # rows >= GROUP pad the group up to tl.dot's minimum of 16
    q_pos = tl.load(q_pos_ptr + tok + offs_g * 0)  # the token's position on every row
    num_keys = tl.load(head_lens_ptr + req * stride_lens_r + head * stride_lens_h)
    num_keys = tl.minimum(num_keys, max_pages * BLOCK_SIZE)  # never read past the table row
    table_row = table_ptr + req * stride_table_r + head * stride_table_h
    q = _load_query_rows(q_ptr, tok + offs_g * 0, head * GROUP + offs_g, group_mask, stride_q_t, stride_q_h,
                         head_dim, BLOCK_D)

    m_safe, l_i = _softmax_stats(q, q_pos, table_row, stride_table_page, kv_ptr, pos_ptr, num_keys,
                                 stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page,
                                 stride_pos_slot, head_dim, qk_scale, GROUP_PAD, BLOCK_SIZE, BLOCK_D,
                                 DOT_MODE)
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    offs_n = tl.arange(0, BLOCK_SIZE)
    out_row = out_ptr + req * stride_out_r + head * stride_out_h
    for blk in range(0, tl.cdiv(num_keys, BLOCK_SIZE)):
        page, in_list, key_pos = _block_keys(table_row, stride_table_page, pos_ptr, stride_pos_page,
                                             stride_pos_slot, blk, num_keys, BLOCK_SIZE)
        visible = _visible(in_list, key_pos, q_pos)
        col = _block_prob_colsum(q, kv_ptr, page, in_list, visible, m_safe, inv_l, group_mask,
                                 stride_kv_page, stride_kv_kind, stride_kv_slot, head_dim, qk_scale,
                                 BLOCK_SIZE, BLOCK_D, DOT_MODE)
        logical = (blk * BLOCK_SIZE + offs_n).to(tl.int64)
        seen = tl.max(tl.where(visible, 1, 0), 0) > 0  # slots the token sees
        tl.atomic_add(out_row + logical * stride_out_slot, col, mask=seen, sem="relaxed")


def window_attention_colsum(
    q: torch.Tensor,
    token_req: torch.Tensor,
    q_pos: torch.Tensor,
    page_table: torch.Tensor,
    head_lens: torch.Tensor,
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-list attention column sums of the observation-window queries.

    Args:
        q:          [T, Hq, D] the last W prompt queries of each request, flattened.
        token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, scale:
                    as in :func:`.paged_attention.paged_attention`.
        out:        optional [R, H, S'] fp32 with S' >= max_pages * bs; the wrapper
                    zeroes it (callers need not).
        impl: "auto" | "triton" | "torch".

    Returns ``out`` with ``out[r, h, i]`` = sum over window tokens t of r and the G query
    heads of group h of softmax_prob(t, head, logical slot i). Entries with
    ``i >= head_lens[r, h]`` are 0; ``out[r, h].sum() == G * #(window tokens of r that
    see at least one key of list h)``.
    """
    num_tokens, _, num_heads, group, head_dim = check_attention_args(
        q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos)
    num_reqs, _, max_pages = page_table.shape
    block_size = kv_pages.shape[2]
    num_slots = max_pages * block_size
    if out is None:
        out = torch.empty(num_reqs, num_heads, num_slots, dtype=torch.float32, device=q.device)
    check_tensor("out", out, torch.float32, dim=3, device=q.device)
    check_shape("out", out, (num_reqs, num_heads, None))
    if out.shape[2] < num_slots:
        raise ValueError(f"out has {out.shape[2]} slots per list; allowed: >= max_pages * "
                         f"block_size = {num_slots}")
    if not use_triton(impl, _window_colsum_kernel, q.device):
        return window_attention_colsum_reference(q, token_req, q_pos, page_table, head_lens,
                                                 kv_pages, slot_pos, scale, out=out)
    out.zero_()
    if num_tokens == 0:
        return out
    _window_colsum_kernel[(num_tokens, num_heads)](
        q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, out,
        q.stride(0), q.stride(1),
        page_table.stride(0), page_table.stride(1), page_table.stride(2),
        head_lens.stride(0), head_lens.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        float(scale) * LOG2E, head_dim, max_pages,
        **attention_launch_constants(q, group, head_dim, block_size, _window_colsum_kernel),
    )
    return out


def window_attention_colsum_reference(
    q: torch.Tensor,
    token_req: torch.Tensor,
    q_pos: torch.Tensor,
    page_table: torch.Tensor,
    head_lens: torch.Tensor,
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch version of :func:`window_attention_colsum` (same arguments, minus ``impl``).

    Same score rule as the attention reference (``list_probs``), without weights.
    """
    num_reqs, num_heads, max_pages = page_table.shape
    block_size = kv_pages.shape[2]
    if out is None:
        out = torch.empty(num_reqs, num_heads, max_pages * block_size, dtype=torch.float32, device=q.device)
    out.zero_()
    for tokens, _ in token_batches(token_req, page_table, block_size, q.shape[2]):
        ql, page, lens, pos, rows = batch_lists(tokens, q, token_req, q_pos, page_table, head_lens, block_size)
        probs, _ = list_probs(ql, page, lens, pos, kv_pages, slot_pos, scale)
        col = probs.sum((1, 2)).view(rows.numel(), num_heads, -1)  # [R, H, S_batch]
        out[:, :, :col.shape[2]].index_add_(0, rows, col)
    return out
