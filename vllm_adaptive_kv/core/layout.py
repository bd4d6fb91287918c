"""The per-head page pool: one preallocated cache shared by every layer and KV head.

A *page* holds ``block_size`` consecutive slots of ONE (layer, kv_head) list. All
layers draw from the same pool, so a page freed by layer 3 head 1 can next hold
tokens of layer 17 head 0 of another request.

Pool tensors (``P`` pages, ``bs`` = block_size, ``D`` = head_dim)::

    kv_pages    [P, 2, bs, D]   K rows in [:, 0], V rows in [:, 1]  (model dtype)
    slot_pos    [P, bs]  int32  original token position of the slot
    slot_flags  [P, bs]  uint8  FLAG_SPECIAL | FLAG_PUNCT bits of the slot's token
    slot_score  [P, bs]  fp32   accumulated attention the slot has received

``kv_pages`` has the byte layout of vLLM's CPU attention cache (``[blocks, heads,
2*bs, D]``, the K block then the V block) with heads folded into blocks, so vLLM's
own KV buffer can be re-viewed as the pool without a copy. Within a page, V is
always stored row by row (``[bs, D]``). K is stored either the same way
(``k_transposed=False``, what the Triton kernels read) or transposed, ``[D, bs]``
(``k_transposed=True``, what vLLM's native CPU attention kernel reads). Code that
reads or writes slots goes through :func:`page_views` (defined with the kernels in
``triton_kernels/_triton.py``, re-exported here), which hides the difference::

    k_pages, v_pages = page_views(kv_pages, k_transposed)   # both [P, bs, D] views
    k_pages[page, offset]   # the K row of one slot, whatever the storage order

A *physical slot id* is ``page * bs + offset`` (int64: large pools overflow int32
once multiplied by the row size).

Per request, a head list is addressed through a page table row::

    page_table [R, L, H, max_pages] int32   (-1 = no page)
    head_lens  [R, L, H]            int32   slots held by the list

    logical slot i of list (r, l, h)
        page   = page_table[r, l, h, i // bs]
        offset = i % bs

      list (r, l, h):  len = 37, bs = 16
      logical  0..15 | 16..31 | 32..36 ...........
      page_table  [  412  ,   7    ,  90019  , -1, -1 ]
                                      ^ partially filled last page

Kernels receive one layer at a time: ``page_table[:, l]`` is ``[R, H, max_pages]``
and ``head_lens[:, l]`` is ``[R, H]`` (both may be strided views).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..triton_kernels import page_views  # noqa: F401  (the within-page layout, read by the kernels too)

FLAG_SPECIAL = 1
FLAG_PUNCT = 2

NO_PAGE = -1


@dataclass
class KVPool:
    """Device tensors of the pool; allocated once, never resized."""

    kv_pages: torch.Tensor  # [P, 2, bs, D]
    slot_pos: torch.Tensor  # [P, bs] int32
    slot_flags: torch.Tensor  # [P, bs] uint8
    slot_score: torch.Tensor  # [P, bs] float32
    k_transposed: bool = False  # K blocks stored [D, bs] (vLLM's CPU kernel layout)

    @property
    def k_pages(self) -> torch.Tensor:
        """[P, bs, D] view of the K rows (strided when ``k_transposed``)."""
        return page_views(self.kv_pages, self.k_transposed)[0]

    @property
    def v_pages(self) -> torch.Tensor:
        """[P, bs, D] view of the V rows."""
        return self.kv_pages[:, 1]

    @property
    def num_pages(self) -> int:
        return self.kv_pages.shape[0]

    @property
    def block_size(self) -> int:
        return self.kv_pages.shape[2]

    @property
    def head_dim(self) -> int:
        return self.kv_pages.shape[3]

    @staticmethod
    def metadata_bytes_per_slot() -> int:
        """Bytes kept beside K and V for every slot: pos (4) + flags (1) + score (4)."""
        return 4 + 1 + 4

    @classmethod
    def allocate(
        cls,
        num_pages: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        k_transposed: bool = False,
    ) -> "KVPool":
        if num_pages <= 0 or block_size <= 0 or head_dim <= 0:
            raise ValueError(
                f"KVPool needs positive sizes, got num_pages={num_pages}, "
                f"block_size={block_size}, head_dim={head_dim}"
            )
        kv = torch.zeros(num_pages, 2, block_size, head_dim, dtype=dtype, device=device)
        return cls.from_kv_pages(kv, k_transposed)

    @classmethod
    def from_kv_pages(cls, kv_pages: torch.Tensor, k_transposed: bool = False) -> "KVPool":
        """Wrap an existing K/V buffer (e.g. a view of vLLM's) and add slot metadata."""
        if kv_pages.dim() != 4 or kv_pages.shape[1] != 2:
            raise ValueError(
                f"kv_pages must be [P, 2, block_size, head_dim], got {tuple(kv_pages.shape)}"
            )
        num_pages, _, block_size, _ = kv_pages.shape
        device = kv_pages.device
        page_views(kv_pages, k_transposed)  # checks the within-page layout
        return cls(
            kv_pages=kv_pages,
            k_transposed=k_transposed,
            slot_pos=torch.full((num_pages, block_size), -1, dtype=torch.int32, device=device),
            slot_flags=torch.zeros(num_pages, block_size, dtype=torch.uint8, device=device),
            slot_score=torch.zeros(num_pages, block_size, dtype=torch.float32, device=device),
        )
