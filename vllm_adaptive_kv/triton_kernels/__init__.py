"""Triton kernels of the per-head page pool, each with a torch reference.

Every public wrapper takes ``impl="auto" | "triton" | "torch"``; "auto" runs Triton on
CUDA tensors or when the kernels were imported under ``TRITON_INTERPRET=1``, and the
torch reference otherwise (also when Triton is not installed: ``HAS_TRITON``).
See ``docs/kernels.md``.
"""

from ._triton import HAS_TRITON, page_views
from .compaction import compact_slots, compact_slots_reference
from .paged_attention import paged_attention, paged_attention_reference
from .window_stats import window_attention_colsum, window_attention_colsum_reference
from .write_kv import write_kv, write_kv_reference

__all__ = [
    "HAS_TRITON",
    "page_views",
    "compact_slots",
    "compact_slots_reference",
    "paged_attention",
    "paged_attention_reference",
    "window_attention_colsum",
    "window_attention_colsum_reference",
    "write_kv",
    "write_kv_reference",
]
