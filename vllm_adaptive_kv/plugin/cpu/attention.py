"""The native CPU attention path: vLLM's CPU attention kernel over per-head page lists.

``NativeCpuAttention`` (an ``AttentionPath``, see ``core/attention.py``) hands the
kernel one *sequence* per (kv head, request) pair. Each sequence has a single KV head and ``G`` query
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
fp32 and bf16 alike, and needs a block size and a head_dim that are multiples of
32 (``native_cpu_attention_available``; otherwise the worker uses the torch path).
(The AMX kernel packs bf16 K differently and is never selected here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.attention import AttentionPath, score_lists
from ...core.step import StepMetadata

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
        self.query_group = num_q_per_kv
        self.head_dim = head_dim
        self.dtype = dtype

    def __call__(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                 block_table: torch.Tensor, scale: float) -> None:
        """Shapes in the module docstring; query_start_loc / seq_lens / block_table int32."""
        ops = self._ops
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(), num_heads=self.query_group, num_kv_heads=1, head_dim=self.head_dim,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=query_start_loc, causal=True,
            sliding_window_size=-1, isa=ISA, enable_kv_split=False)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
            scheduler_metadata=metadata, s_aux=None)


@dataclass
class NativePlan:
    """Per-step tensors of the native path.

    seq_start [H*R + 1] int32: first query row of sequence ``s = h * R + i`` in the
    head-major query ``q.view(T, H, G, D).transpose(0, 1)``, i.e. ``h * T + start_i``::

        T = 5, requests (start, n) = (0, 3), (3, 2), H = 2
        seq_start = [0, 3, 5, 8, 10]     (h0 r0, h0 r1, h1 r0, h1 r1, end)
    """

    seq_start: torch.Tensor


class NativeCpuAttention(AttentionPath):
    """vLLM's CPU kernel for attention; observation rows scored by ``score_lists``."""

    name = "vllm-cpu-kernel"
    k_transposed = True
    scores_by_list = True  # the kernel returns no probabilities

    def __init__(self, query_group: int, head_dim: int, dtype: torch.dtype) -> None:
        self.kernel = VllmCpuPagedAttention(query_group, head_dim, dtype)
        self.query_group = query_group

    def bind(self, pool, cache, query_group: int = 1) -> None:
        if query_group != self.query_group:
            raise ValueError(f"query_group={query_group} does not match the kernel's {self.query_group}")
        super().bind(pool, cache, query_group)
        # [P, 1, bs, D] views of the K / V blocks: one KV head per (list) sequence
        self._keys = pool.kv_pages[:, 0].unsqueeze(1)
        self._values = pool.kv_pages[:, 1].unsqueeze(1)

    def plan(self, meta: StepMetadata) -> NativePlan:
        total = meta.requests.total_tokens
        heads = self.cache.lens.shape[2]
        starts = torch.tensor(meta.requests.starts, dtype=torch.int64)
        seq_start = (torch.arange(heads, dtype=torch.int64)[:, None] * total + starts).reshape(-1)
        seq_start = torch.cat([seq_start, torch.tensor([heads * total])]).to(torch.int32)
        return NativePlan(seq_start.to(self.cache.device))

    def attend(self, layer, q, out, meta, scale) -> None:
        """All of the step's queries in one kernel call, then the scores.

        Query rows are regrouped head-major so each (head, request) sequence is
        contiguous; its keys are the list's first ``seq_len`` slots, the last
        ``num_tokens`` of which are this step's own tokens (causal by index).
        """
        num_tokens, _, head_dim = q.shape
        heads = self.cache.lens.shape[2]
        query = q.view(num_tokens, heads, self.query_group, head_dim).transpose(0, 1).reshape(-1, self.query_group, head_dim)
        result = torch.empty_like(query)
        rows = meta.requests.rows_t
        seq_lens = self.cache.lens[rows, layer].t().reshape(-1)  # [H*R] int32
        table = self.cache.table[rows, layer, :, :max(meta.requests.width, 1)].transpose(0, 1).reshape(
            heads * rows.numel(), -1)
        self.kernel(query, self._keys, self._values, result, meta.path.seq_start, seq_lens, table, scale)
        out.view(num_tokens, heads, self.query_group, head_dim).copy_(
            result.view(heads, num_tokens, self.query_group, head_dim).transpose(0, 1))
        if meta.scoring is not None:
            with self.timer.part("score_s"):
                score_lists(self.pool, self.cache, layer, q, meta, scale)
