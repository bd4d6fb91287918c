"""vLLM's native CPU attention kernel over per-head page lists.

The runtime (``HeadCacheRuntime._attend_native``) hands this op one *sequence*
per (kv head, request) pair. Each sequence has a single KV head and ``G`` query
heads (the GQA group), and its own block table: the page list of that head. The
kernel is the one vanilla vLLM runs on CPU (``cpu_attention_with_kv_cache``), so
attention over compressed lists costs what attention over the same number of
uncompressed tokens costs in vanilla vLLM.

    sequence s = h * R + i    (kv head h, request i of the step)
    query      [sum q_len, G, D]   rows of s: query_start_loc[s] .. [s + 1]
    key_cache  [P, 1, bs, D]       page p, K stored [D, bs] (KVPool.k_transposed)
    block_table[s, j]              j-th page of the list of (request i, head h)
    seq_lens[s]                    slots in that list, this step's tokens last

The "vec" ISA kernel is used whatever the machine offers: it reads K blocks
transposed (``[D, bs]``, what ``layout.page_views`` calls ``k_transposed``) for
fp32 and bf16 alike, and needs a block size that is a multiple of 32. (The AMX
kernel packs bf16 K differently and is never selected here.)
"""

from __future__ import annotations

import torch

ISA = "vec"
BLOCK_MULTIPLE = 32


def native_cpu_attention_available(block_size: int, head_dim: int) -> bool:
    """True when vLLM's CPU kernel can run on head pages of this shape."""
    if block_size % BLOCK_MULTIPLE or head_dim % 32:
        return False
    try:
        import vllm._custom_ops  # noqa: F401

        return hasattr(torch.ops._C, "cpu_attention_with_kv_cache")
    except (ImportError, AttributeError, RuntimeError):
        return False


class VllmCpuPagedAttention:
    """Callable: causal attention of paged single-KV-head sequences, in place into ``out``."""

    def __init__(self, num_q_per_kv: int, head_dim: int, dtype: torch.dtype) -> None:
        from vllm import _custom_ops as ops

        self._ops = ops
        self.group = num_q_per_kv
        self.head_dim = head_dim
        self.dtype = dtype

    def __call__(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                 block_table: torch.Tensor, scale: float) -> None:
        """Shapes in the module docstring; query_start_loc / seq_lens / block_table int32."""
        ops = self._ops
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(), num_heads=self.group, num_kv_heads=1, head_dim=self.head_dim,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=query_start_loc, causal=True,
            sliding_window_size=-1, isa=ISA, enable_kv_split=False)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
            scheduler_metadata=metadata, s_aux=None)
