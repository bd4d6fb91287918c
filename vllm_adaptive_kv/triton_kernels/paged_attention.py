"""paged_attention: attention over ragged, compacted per-(request, kv head) page lists.

Each kv head ``h`` of request ``r`` owns its own list of slots (``page_table[r, h]``,
``head_lens[r, h]``), so different heads of one request hold different tokens after
eviction. Because lists are compacted and ragged, causality is decided by ORIGINAL
positions: key slot ``s`` is visible to query ``t`` iff ``slot_pos[s] <= q_pos[t]``.

The jit helpers here (query-group load, block visibility, block logits, softmax
statistics, normalized column sums) are shared with :mod:`.window_stats`.
"""

from __future__ import annotations

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

__all__ = ["paged_attention", "paged_attention_reference"]

LOG2E = math.log2(math.e)

# Bound on the elements one token chunk of the torch reference materializes
# (gathered K or V rows, fp32): keeps long prefills from gathering [T, H, S, D] at once.
_REFERENCE_CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------- Triton


@triton.jit
def _load_query_group(q_ptr, tok, head, stride_q_t, stride_q_h, head_dim,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """[GROUP_PAD, BLOCK_D] queries of the GROUP query heads sharing kv head ``head``.

    Rows >= GROUP (padding up to tl.dot's minimum of 16) and columns >= head_dim are 0.
    """
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    q_heads = head * GROUP + offs_g
    mask = (offs_g < GROUP)[:, None] & (offs_d < head_dim)[None, :]
    ptrs = q_ptr + tok * stride_q_t + q_heads[:, None] * stride_q_h + offs_d[None, :]
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
def _block_visibility(table_row_ptr, stride_table_page, pos_ptr, stride_pos_page, stride_pos_slot,
                      blk, num_keys, query_pos, BLOCK_SIZE: tl.constexpr):
    """Page (int64) of logical block ``blk`` and which of its BLOCK_SIZE slots the query sees."""
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
    return page, in_list & (key_pos <= query_pos)


@triton.jit
def _load_block_rows(kv_ptr, page, kind, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                     head_dim, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_SIZE, BLOCK_D] K (kind 0) or V (kind 1) rows of ``page``; invisible rows are 0."""
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    base = kv_ptr + page * stride_kv_page + kind * stride_kv_kind
    ptrs = base + offs_n[:, None] * stride_kv_slot + offs_d[None, :]
    mask = visible[:, None] & (offs_d < head_dim)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _block_logits(q, kv_ptr, page, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                  head_dim, qk_scale, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_MODE: tl.constexpr):
    """[GROUP_PAD, BLOCK_SIZE] logits in log2 units (scale * log2 e folded in); -inf if invisible."""
    k = _load_block_rows(kv_ptr, page, 0, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                         head_dim, BLOCK_SIZE, BLOCK_D)
    s = _dot(q, tl.trans(k), DOT_MODE) * qk_scale
    return tl.where(visible[None, :], s, float("-inf"))


@triton.jit
def _finite_max(m):
    """Row max with -inf (nothing visible yet) replaced by 0, so exp2(x - m) never sees inf - inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _softmax_stats(q, table_row_ptr, stride_table_page, kv_ptr, pos_ptr, num_keys, query_pos,
                   stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page, stride_pos_slot,
                   head_dim, qk_scale, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr):
    """Online max and sum of exp2 over all visible keys: (finite row max, row sum), [GROUP_PAD] each."""
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    for blk in range(0, tl.cdiv(num_keys, BLOCK_SIZE)):
        page, visible = _block_visibility(table_row_ptr, stride_table_page, pos_ptr, stride_pos_page,
                                          stride_pos_slot, blk, num_keys, query_pos, BLOCK_SIZE)
        s = _block_logits(q, kv_ptr, page, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                          head_dim, qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = _finite_max(m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    return _finite_max(m_i), l_i


@triton.jit
def _block_prob_colsum(q, kv_ptr, page, visible, m_safe, inv_l, group_mask,
                       stride_kv_page, stride_kv_kind, stride_kv_slot, head_dim, qk_scale,
                       BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr):
    """[BLOCK_SIZE] softmax probabilities of the block's keys, summed over the real query heads."""
    s = _block_logits(q, kv_ptr, page, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                      head_dim, qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)
    p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
    p = tl.where(group_mask[:, None], p, 0.0)  # padding rows are not query heads
    return tl.sum(p, 0)


@triton.jit
def _paged_attention_kernel(
    q_ptr, token_req_ptr, q_pos_ptr, table_ptr, head_lens_ptr, kv_ptr, pos_ptr, out_ptr, score_ptr,
    weight_ptr, stride_q_t, stride_q_h, stride_out_t, stride_out_h,
    stride_table_r, stride_table_h, stride_table_page, stride_lens_r, stride_lens_h,
    stride_kv_page, stride_kv_kind, stride_kv_slot, stride_pos_page, stride_pos_slot,
    stride_score_page, stride_score_slot,
    qk_scale, head_dim, max_pages,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr, ACCUMULATE_SCORE: tl.constexpr, WEIGHTED: tl.constexpr,
):
    """Grid (T, H): one program = one query token x one kv head (its G query heads)."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    req = tl.load(token_req_ptr + tok).to(tl.int64)
    query_pos = tl.load(q_pos_ptr + tok)
    num_keys = tl.load(head_lens_ptr + req * stride_lens_r + head * stride_lens_h)
    num_keys = tl.minimum(num_keys, max_pages * BLOCK_SIZE)  # never read past the table row
    table_row = table_ptr + req * stride_table_r + head * stride_table_h
    q = _load_query_group(q_ptr, tok, head, stride_q_t, stride_q_h, head_dim, GROUP, GROUP_PAD, BLOCK_D)

    # Pass 1: online softmax with the V accumulation (flash-attention style).
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for blk in range(0, tl.cdiv(num_keys, BLOCK_SIZE)):
        page, visible = _block_visibility(table_row, stride_table_page, pos_ptr, stride_pos_page,
                                          stride_pos_slot, blk, num_keys, query_pos, BLOCK_SIZE)
        s = _block_logits(q, kv_ptr, page, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                          head_dim, qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = _finite_max(m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_block_rows(kv_ptr, page, 1, visible, stride_kv_page, stride_kv_kind, stride_kv_slot,
                             head_dim, BLOCK_SIZE, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_MODE)
        m_i = m_new

    # No visible key: l = 0 and acc = 0, so dividing by 1 writes zeros instead of NaN.
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    group_mask = offs_g < GROUP
    out_ptrs = (out_ptr + tok * stride_out_t + (head * GROUP + offs_g)[:, None] * stride_out_h
                + offs_d[None, :])
    out_mask = group_mask[:, None] & (offs_d < head_dim)[None, :]
    tl.store(out_ptrs, (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)

    if ACCUMULATE_SCORE:
        # Pass 2: recompute the logits now that max and sum are final, to add normalized
        # probabilities. Other tokens / programs hit the same slots, hence atomics.
        m_final = _finite_max(m_i)
        offs_n = tl.arange(0, BLOCK_SIZE)
        if WEIGHTED:
            inv_l = inv_l * tl.load(weight_ptr + tok)  # scales every probability of this token
        for blk in range(0, tl.cdiv(num_keys, BLOCK_SIZE)):
            page, visible = _block_visibility(table_row, stride_table_page, pos_ptr, stride_pos_page,
                                              stride_pos_slot, blk, num_keys, query_pos, BLOCK_SIZE)
            col = _block_prob_colsum(q, kv_ptr, page, visible, m_final, inv_l, group_mask,
                                     stride_kv_page, stride_kv_kind, stride_kv_slot, head_dim,
                                     qk_scale, BLOCK_SIZE, BLOCK_D, DOT_MODE)
            score_ptrs = score_ptr + page * stride_score_page + offs_n * stride_score_slot
            tl.atomic_add(score_ptrs, col, mask=visible, sem="relaxed")  # order is irrelevant for sums


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


def attention_launch_constants(q: torch.Tensor, group: int, head_dim: int, block_size: int,
                               kernel) -> dict:
    """Compile-time constants shared by the attention-style kernels."""
    return dict(
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        BLOCK_SIZE=block_size,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_MODE=dot_mode(q.dtype, kernel),
    )


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
) -> torch.Tensor:
    """Causal (by original position) attention over per-head page lists, with GQA.

    Args:
        q:          [T, Hq, D] queries in the pool dtype; Hq = H * G, query head ``hq``
                    reads kv head ``hq // G``.
        token_req:  [T] int32 request row (into page_table / head_lens) of each query.
        q_pos:      [T] int32 original position of each query.
        page_table: [R, H, max_pages] int32, -1 = no page (may be a strided layer view).
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

    Returns ``out``: softmax(scale * q.k) over visible keys times v, accumulated in fp32.
    A query that sees no key gets zeros. Decode is T = R with one token per request;
    prefill chunks may hold several tokens per request.
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
    if k_transposed and impl == "triton":
        raise ValueError("impl='triton' needs k_transposed=False: the kernel reads K row by row")
    if k_transposed or not use_triton(impl, _paged_attention_kernel, q.device):
        return paged_attention_reference(q, token_req, q_pos, page_table, head_lens, kv_pages,
                                         slot_pos, scale, out=out, slot_score=slot_score,
                                         score_weight=score_weight, k_transposed=k_transposed)
    if num_tokens == 0:
        return out
    score = slot_score if slot_score is not None else slot_pos  # dummy pointer when unused
    weight = score_weight if score_weight is not None else q_pos  # dummy pointer when unused
    _paged_attention_kernel[(num_tokens, num_heads)](
        q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, out, score, weight,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        page_table.stride(0), page_table.stride(1), page_table.stride(2),
        head_lens.stride(0), head_lens.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        score.stride(0), score.stride(1),
        float(scale) * LOG2E, head_dim, page_table.shape[2],
        ACCUMULATE_SCORE=slot_score is not None,
        WEIGHTED=score_weight is not None,
        **attention_launch_constants(q, group, head_dim, kv_pages.shape[2], _paged_attention_kernel),
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
                  slot_score, score_weight, k_transposed, decode_logits_in_pool_dtype):
    """Attention (and scores) of the requests of ``tokens [R, t]`` in one batch."""
    num_reqs, t = tokens.shape
    num_q_heads, head_dim = q.shape[1:]
    ql, page, lens, pos, _ = batch_lists(tokens, q, token_req, q_pos, page_table, head_lens, kv_pages.shape[2])
    attn, probs, page = list_attention(ql, page, lens, pos, kv_pages, slot_pos, scale, k_transposed,
                                       decode_logits_in_pool_dtype)
    attn = attn.view(num_reqs, -1, t, attn.shape[2], head_dim).transpose(1, 2)
    out[tokens] = attn.reshape(num_reqs, t, num_q_heads, head_dim).to(out.dtype)
    if slot_score is not None:
        weight = None
        if score_weight is not None:
            weight = score_weight[tokens].repeat_interleave(page_table.shape[1], dim=0)
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
) -> torch.Tensor:
    """Torch version of :func:`paged_attention` (same arguments, minus ``impl``).

    Also the runtime's torch attention path, so it reads both K layouts
    (``k_transposed``) and takes ``list_probs``'s precision switch
    (``decode_logits_in_pool_dtype``). One-token requests (decode) run as one batch; each longer
    run of one request's tokens (a prefill chunk) gathers its lists once and is
    split over its tokens so the probabilities stay bounded. Reads ``token_req``
    and the lengths on the host (it is a reference and a CPU path).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for tokens, one_token_runs in token_batches(token_req, page_table, kv_pages.shape[2], q.shape[2]):
        # Only one-token requests are decode rows; a one-token piece of a split chunk is not.
        _attend_batch(tokens, q, token_req, q_pos, page_table, head_lens, kv_pages, slot_pos, scale, out,
                      slot_score, score_weight, k_transposed, decode_logits_in_pool_dtype and one_token_runs)
    return out
