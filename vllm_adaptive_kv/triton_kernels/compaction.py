"""compaction: slide the kept slots of each head list down over the evicted ones.

After eviction a list keeps a subset of its slots; compaction moves kept slot ``j``
(logical index ``old_j``) to logical index ``new_j`` so that the list is again dense
``0..kept-1`` and its trailing pages can be freed. Every slot field moves along:
K row, V row, position, flags and score.

Planner contract (the caller guarantees it; nothing here checks it, since that
would need a host sync): within row ``m``

* moves are listed in ascending logical order of their sources,
* each destination's logical index is smaller than its source's,
* no destination equals the source of a LATER move (of the same row), and all
  destinations are distinct;

and different rows touch disjoint slots (each row is one head list). Then applying
the moves one by one equals "gather all sources, then scatter to all
destinations", which is what both implementations do.
"""

from __future__ import annotations

import torch

from ._triton import (
    check_last_dim_contiguous,
    check_pool,
    check_shape,
    check_tensor,
    page_views,
    tl,
    triton,
    use_triton,
)

__all__ = ["compact_slots", "compact_slots_reference"]

MOVES_PER_CHUNK = 32


@triton.jit
def _compact_slots_kernel(
    kv_ptr, pos_ptr, flags_ptr, score_ptr, src_ptr, dst_ptr, num_moves_ptr,
    stride_kv_page, stride_kv_kind, stride_kv_slot,
    stride_pos_page, stride_pos_slot, stride_flags_page, stride_flags_slot,
    stride_score_page, stride_score_slot,
    stride_src_m, stride_src_j, stride_dst_m, stride_dst_j,
    head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_MOVES: tl.constexpr,
):
    """Grid (M,): one program applies row m's moves, BLOCK_MOVES at a time.

    Why this is race-free: rows touch disjoint slots, so programs never interact.
    Inside a program, a chunk loads ALL its sources, then a barrier, then stores. A
    chunk's store may hit a slot read by the same chunk (an earlier move's source);
    the barrier makes every thread finish its loads before any thread stores. A
    store never hits a LATER chunk's source (contract), and the barrier after the
    stores orders them before the next chunk's loads anyway. So the result equals
    sequential application of the moves.
    """
    row = tl.program_id(0).to(tl.int64)
    num_moves = tl.load(num_moves_ptr + row)
    offs_j = tl.arange(0, BLOCK_MOVES)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for start in range(0, num_moves, BLOCK_MOVES):
        move = start + offs_j
        active = move < num_moves
        src = tl.load(src_ptr + row * stride_src_m + move * stride_src_j, mask=active, other=0)
        dst = tl.load(dst_ptr + row * stride_dst_m + move * stride_dst_j, mask=active, other=0)
        src_page, src_off = src // BLOCK_SIZE, src % BLOCK_SIZE
        dst_page, dst_off = dst // BLOCK_SIZE, dst % BLOCK_SIZE
        row_mask = active[:, None] & d_mask[None, :]

        src_k = (kv_ptr + src_page[:, None] * stride_kv_page + src_off[:, None] * stride_kv_slot
                 + offs_d[None, :])
        k = tl.load(src_k, mask=row_mask)
        v = tl.load(src_k + stride_kv_kind, mask=row_mask)
        pos = tl.load(pos_ptr + src_page * stride_pos_page + src_off * stride_pos_slot, mask=active)
        flag = tl.load(flags_ptr + src_page * stride_flags_page + src_off * stride_flags_slot, mask=active)
        score = tl.load(score_ptr + src_page * stride_score_page + src_off * stride_score_slot, mask=active)
        tl.debug_barrier()  # all loads of this chunk before any store (WAR within the chunk)

        dst_k = (kv_ptr + dst_page[:, None] * stride_kv_page + dst_off[:, None] * stride_kv_slot
                 + offs_d[None, :])
        tl.store(dst_k, k, mask=row_mask)
        tl.store(dst_k + stride_kv_kind, v, mask=row_mask)
        tl.store(pos_ptr + dst_page * stride_pos_page + dst_off * stride_pos_slot, pos, mask=active)
        tl.store(flags_ptr + dst_page * stride_flags_page + dst_off * stride_flags_slot, flag, mask=active)
        tl.store(score_ptr + dst_page * stride_score_page + dst_off * stride_score_slot, score, mask=active)
        tl.debug_barrier()  # this chunk's stores before the next chunk's loads


def _check_args(kv_pages, slot_pos, slot_flags, slot_score, src_slot, dst_slot, num_moves):
    check_pool(kv_pages, slot_pos, slot_flags, slot_score)
    for name, t in (("slot_pos", slot_pos), ("slot_flags", slot_flags), ("slot_score", slot_score)):
        if t is None:
            raise ValueError(f"{name} is None; compact_slots moves every pool field")
    device = kv_pages.device
    check_tensor("src_slot", src_slot, torch.int64, dim=2, device=device)
    check_tensor("dst_slot", dst_slot, torch.int64, dim=2, device=device)
    check_shape("dst_slot", dst_slot, tuple(src_slot.shape))
    check_tensor("num_moves", num_moves, torch.int32, dim=1, device=device)
    check_shape("num_moves", num_moves, (src_slot.shape[0],))
    check_last_dim_contiguous("num_moves", num_moves)  # read without a stride


def compact_slots(
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_flags: torch.Tensor,
    slot_score: torch.Tensor,
    src_slot: torch.Tensor,
    dst_slot: torch.Tensor,
    num_moves: torch.Tensor,
    impl: str = "auto",
    k_transposed: bool = False,
) -> None:
    """Move slots ``src_slot[m, j] -> dst_slot[m, j]`` for ``j < num_moves[m]``, in place.

    Args:
        kv_pages, slot_pos, slot_flags, slot_score: the pool (``core/layout.py``).
        src_slot, dst_slot: [M, max_moves] int64 physical slot ids; entries at
            ``j >= num_moves[m]`` are ignored.
        num_moves: [M] int32 moves of each row (one row = one head list), <= max_moves.
        impl: "auto" | "triton" | "torch".
        k_transposed: K blocks are stored ``[D, bs]`` (``page_views``);
            torch only.

    The planner contract in the module docstring must hold. Source slots keep their
    old contents (they are garbage afterwards).
    """
    _check_args(kv_pages, slot_pos, slot_flags, slot_score, src_slot, dst_slot, num_moves)
    if k_transposed and impl == "triton":
        raise ValueError("impl='triton' needs k_transposed=False: the kernel moves K row by row")
    if k_transposed or not use_triton(impl, _compact_slots_kernel, kv_pages.device):
        compact_slots_reference(kv_pages, slot_pos, slot_flags, slot_score, src_slot, dst_slot, num_moves,
                                k_transposed)
        return
    num_rows = src_slot.shape[0]
    if num_rows == 0 or src_slot.shape[1] == 0:
        return
    head_dim = kv_pages.shape[3]
    _compact_slots_kernel[(num_rows,)](
        kv_pages, slot_pos, slot_flags, slot_score, src_slot, dst_slot, num_moves,
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
        slot_pos.stride(0), slot_pos.stride(1), slot_flags.stride(0), slot_flags.stride(1),
        slot_score.stride(0), slot_score.stride(1),
        src_slot.stride(0), src_slot.stride(1), dst_slot.stride(0), dst_slot.stride(1),
        head_dim,
        BLOCK_SIZE=kv_pages.shape[2],
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_MOVES=MOVES_PER_CHUNK,
    )


def compact_slots_reference(
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_flags: torch.Tensor,
    slot_score: torch.Tensor,
    src_slot: torch.Tensor,
    dst_slot: torch.Tensor,
    num_moves: torch.Tensor,
    k_transposed: bool = False,
) -> None:
    """Torch version of :func:`compact_slots`: gather every source, then scatter."""
    block_size = kv_pages.shape[2]
    k_pages, v_pages = page_views(kv_pages, k_transposed)
    moves = torch.arange(src_slot.shape[1], device=src_slot.device)
    active = moves[None, :] < num_moves[:, None].long()
    src, dst = src_slot[active], dst_slot[active]
    src_page, src_off = src // block_size, src % block_size
    dst_page, dst_off = dst // block_size, dst % block_size
    # Advanced indexing copies, so every source is read before anything is written.
    k_rows = k_pages[src_page, src_off]  # [N, D]
    v_rows = v_pages[src_page, src_off]
    pos = slot_pos[src_page, src_off]
    flags = slot_flags[src_page, src_off]
    score = slot_score[src_page, src_off]
    k_pages[dst_page, dst_off] = k_rows
    v_pages[dst_page, dst_off] = v_rows
    slot_pos[dst_page, dst_off] = pos
    slot_flags[dst_page, dst_off] = flags
    slot_score[dst_page, dst_off] = score
