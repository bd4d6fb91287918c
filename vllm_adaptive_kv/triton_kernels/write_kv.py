"""write_kv: scatter new K/V rows (and their slot metadata) into the page pool.

Every (token, kv head) pair has its own physical slot, because each head list is
paged (and evicted) independently; ``slot_mapping[t, h] = page * bs + offset``.
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

__all__ = ["write_kv", "write_kv_reference"]


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, slot_mapping_ptr, positions_ptr, flags_ptr,
    kv_ptr, pos_ptr, slot_flags_ptr, score_ptr,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_map_t, stride_map_h,
    stride_kv_page, stride_kv_kind, stride_kv_slot,
    stride_pos_page, stride_pos_slot,
    stride_flags_page, stride_flags_slot,
    stride_score_page, stride_score_slot,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (T, H): one program copies one K row and one V row of length D."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)

    slot = tl.load(slot_mapping_ptr + tok * stride_map_t + head * stride_map_h).to(tl.int64)
    write = slot >= 0
    # -1 means "skip": keep the address arithmetic in range, the masks drop the writes.
    slot = tl.where(write, slot, 0)
    page = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_d < tl.where(write, head_dim, 0)  # empty row when skipped
    k = tl.load(key_ptr + tok * stride_key_t + head * stride_key_h + offs_d, mask=row_mask)
    v = tl.load(value_ptr + tok * stride_value_t + head * stride_value_h + offs_d, mask=row_mask)
    row = kv_ptr + page * stride_kv_page + offset * stride_kv_slot + offs_d
    tl.store(row, k, mask=row_mask)
    tl.store(row + stride_kv_kind, v, mask=row_mask)

    pos = tl.load(positions_ptr + tok)
    flag = tl.load(flags_ptr + tok)
    tl.store(pos_ptr + page * stride_pos_page + offset * stride_pos_slot, pos, mask=write)
    tl.store(slot_flags_ptr + page * stride_flags_page + offset * stride_flags_slot, flag, mask=write)
    tl.store(score_ptr + page * stride_score_page + offset * stride_score_slot, 0.0, mask=write)


def _check_args(key, value, slot_mapping, positions, flags, kv_pages, slot_pos, slot_flags, slot_score):
    check_pool(kv_pages, slot_pos, slot_flags, slot_score)
    for name, t in (("slot_pos", slot_pos), ("slot_flags", slot_flags), ("slot_score", slot_score)):
        if t is None:
            raise ValueError(f"{name} is None; write_kv needs every pool tensor")
    device = kv_pages.device
    check_tensor("key", key, kv_pages.dtype, dim=3, device=device)
    num_tokens, num_heads, head_dim = key.shape
    if head_dim != kv_pages.shape[3]:
        raise ValueError(f"key has head_dim {head_dim}; kv_pages has head_dim {kv_pages.shape[3]}")
    check_tensor("value", value, kv_pages.dtype, dim=3, device=device)
    check_shape("value", value, tuple(key.shape))
    check_last_dim_contiguous("key", key)
    check_last_dim_contiguous("value", value)
    check_tensor("slot_mapping", slot_mapping, torch.int64, dim=2, device=device)
    check_shape("slot_mapping", slot_mapping, (num_tokens, num_heads))
    check_tensor("positions", positions, torch.int32, dim=1, device=device)
    check_shape("positions", positions, (num_tokens,))
    check_tensor("flags", flags, torch.uint8, dim=1, device=device)
    check_shape("flags", flags, (num_tokens,))
    check_last_dim_contiguous("positions", positions)  # 1-D inputs are read without strides
    check_last_dim_contiguous("flags", flags)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    flags: torch.Tensor,
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_flags: torch.Tensor,
    slot_score: torch.Tensor,
    impl: str = "auto",
    k_transposed: bool = False,
) -> None:
    """Write each token's K/V rows and metadata into its per-head slot, in place.

    Args:
        key, value:   [T, H, D] in the pool dtype, last dim contiguous.
        slot_mapping: [T, H] int64 physical slot id (``page * bs + offset``); -1 = skip.
        positions:    [T] int32 (contiguous) original token position -> ``slot_pos``.
        flags:        [T] uint8 (contiguous) token-class bits -> ``slot_flags``.
        kv_pages, slot_pos, slot_flags, slot_score: the pool (see ``core/layout.py``);
            ``slot_score`` of every written slot is reset to 0.
        impl: "auto" | "triton" | "torch".
        k_transposed: K blocks are stored ``[D, bs]`` (``page_views``);
            torch only.

    Two (token, head) pairs must not name the same slot (which write wins is undefined).
    """
    _check_args(key, value, slot_mapping, positions, flags, kv_pages, slot_pos, slot_flags, slot_score)
    if k_transposed and impl == "triton":
        raise ValueError("impl='triton' needs k_transposed=False: the kernel writes K row by row")
    if k_transposed or not use_triton(impl, _write_kv_kernel, kv_pages.device):
        write_kv_reference(key, value, slot_mapping, positions, flags,
                           kv_pages, slot_pos, slot_flags, slot_score, k_transposed)
        return
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0 or num_heads == 0:
        return
    _write_kv_kernel[(num_tokens, num_heads)](
        key, value, slot_mapping, positions, flags,
        kv_pages, slot_pos, slot_flags, slot_score,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        slot_mapping.stride(0), slot_mapping.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        slot_flags.stride(0), slot_flags.stride(1),
        slot_score.stride(0), slot_score.stride(1),
        head_dim,
        BLOCK_SIZE=kv_pages.shape[2],
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def write_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    flags: torch.Tensor,
    kv_pages: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_flags: torch.Tensor,
    slot_score: torch.Tensor,
    k_transposed: bool = False,
) -> None:
    """Torch version of :func:`write_kv` (same arguments, minus ``impl``)."""
    block_size = kv_pages.shape[2]
    k_pages, v_pages = page_views(kv_pages, k_transposed)
    num_heads = key.shape[1]
    write = slot_mapping >= 0  # [T, H]
    slots = slot_mapping[write]
    page, offset = slots // block_size, slots % block_size
    k_pages[page, offset] = key[write]
    v_pages[page, offset] = value[write]
    # Metadata is per token; every kv head of the token gets the same values.
    slot_pos[page, offset] = positions[:, None].expand(-1, num_heads)[write]
    slot_flags[page, offset] = flags[:, None].expand(-1, num_heads)[write]
    slot_score[page, offset] = 0.0
