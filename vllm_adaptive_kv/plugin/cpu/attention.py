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
from ...core.buffers import StepBuffers
from ...core.step import StepMetadata
from ...cpu_kernels import HAS_CPU_KERNELS, score_rows, scored_decode_attention
from ...cpu_kernels import compact_slots as compact_slots_cpu
from ...cpu_kernels import write_kv as write_kv_cpu

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
class NativeLayer:
    """One layer's share of the step: what vLLM's kernel attends, what ours attends and scores.

    The vLLM kernel gets the ``Ns`` (kv head, request) sequences of the layer that do
    not score at decode (every sequence in a step that holds prefill tokens), in
    head-major order::

        query_rows [Nq] int64   head-major rows (``h * T + t``, the rows of
                                ``q.view(T, H, G, D).transpose(0, 1)``) of its sequences, in
                                order; None when the layer's kernel attends every sequence
        seq_start  [Ns + 1] int32   first query row of each sequence in that query
        seq_lens   [Ns] int32   slots of each sequence's list (this step's tokens last)
        table      [Ns, Wb] int32   each sequence's pages (Wb: the step's widest list)

    ``scored`` = (token, row, head) int64 [N]: the decode lists whose slot scores grow this
    step; ``scored_decode_attention`` (C++) attends them and adds their scores in the same
    pass, writing their output rows last. None when no list of the layer scores at decode, or when the C++ kernels are not
    built (then vLLM's kernel attends every list and ``score_lists`` scores in torch).
    """

    query_rows: torch.Tensor | None
    seq_start: torch.Tensor
    seq_lens: torch.Tensor
    table: torch.Tensor
    scored: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()


@dataclass
class NativePlan:
    """Per-step tensors of the native path: one ``NativeLayer`` per layer.

    Sequence ``s = h * R + i`` is kv head h of request i; in head-major rows
    ``q.view(T, H, G, D).transpose(0, 1)`` it starts at ``h * T + start_i``::

        T = 5, requests (start, n) = (0, 3), (3, 2), H = 2
        seq_start = [0, 3, 5, 8, 10]     (h0 r0, h0 r1, h1 r0, h1 r1, end)

    Every layer's seq_lens and table come from one gather of the step's lists, and
    layers with no scored list share one query_rows / seq_start.

    span_lists = (first, count, row, head) int64 [N]: the prefill observation rows
    (``StepScoring.spans``) as ``score_rows`` takes them, every kv head of each span's
    request (the same lists at every layer); None when there are none or the C++
    kernels are not built (then ``score_lists`` scores them in torch).
    """

    layers: list[NativeLayer]
    span_lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class NativeCpuAttention(AttentionPath):
    """vLLM's CPU kernel for attention; decode lists that score, our C++ kernel (or torch).

    ``fused_scores`` (default: when ``vllm_adaptive_kv._C`` is built) sends the decode
    lists whose scores grow (``StepScoring.decode_lists``) to ``scored_decode_attention``,
    which attends them and adds their scores reading K and V once; vLLM's kernel attends
    the rest. Without it vLLM's kernel attends every list and ``score_lists`` gathers the
    scored ones again in torch. Observation rows of prefill chunks (the prompt's last
    window) are scored by the C++ ``score_rows`` (``score_lists`` in torch without it).

    Per-step tensors are views of ``StepBuffers`` sized at ``bind`` for a decode step of
    every request row (``max_reqs`` tokens): decode steps allocate no buffer.
    """

    name = "vllm-cpu-kernel"
    k_transposed = True
    scores_by_list = True  # the kernel returns no probabilities

    def __init__(self, query_group: int, head_dim: int, dtype: torch.dtype, fused_scores: bool | None = None) -> None:
        self.kernel = VllmCpuPagedAttention(query_group, head_dim, dtype)
        self.query_group = query_group
        self.head_dim = head_dim
        self.dtype = dtype
        self.fused_scores = HAS_CPU_KERNELS if fused_scores is None else fused_scores
        if self.fused_scores and not HAS_CPU_KERNELS:
            raise RuntimeError("fused_scores=True needs vllm_adaptive_kv._C (make setup builds it)")

    def bind(self, pool, cache, query_group: int = 1) -> None:
        if query_group != self.query_group:
            raise ValueError(f"query_group={query_group} does not match the kernel's {self.query_group}")
        super().bind(pool, cache, query_group)
        # [P, 1, bs, D] views of the K / V blocks: one KV head per (list) sequence
        self._keys = pool.kv_pages[:, 0].unsqueeze(1)
        self._values = pool.kv_pages[:, 1].unsqueeze(1)
        self.buffers = StepBuffers(cache.device)
        max_reqs, layers, heads = cache.shape
        lists = max_reqs * layers * heads  # a decode step of every row: one token per list
        rows = max_reqs * heads * query_group * self.head_dim
        for name, numel, dtype in (("query", rows, self.dtype), ("query_rows", rows, self.dtype),
                                   ("result", rows, self.dtype), ("out_rows", rows, self.dtype),
                                   ("list_id", lists, torch.int64), ("seq_lens", lists, torch.int32),
                                   ("table", lists * cache.width, torch.int32)):
            self.buffers.reserve(name, numel, dtype)

    # --- per step -----------------------------------------------------------------

    def plan(self, meta: StepMetadata) -> NativePlan:
        """Split every layer's sequences between the two kernels and gather their tables."""
        requests = meta.requests
        layers, heads = self.cache.shape[1], self.cache.shape[2]
        num_reqs, total = len(requests.rows), requests.total_tokens
        device = self.cache.device
        counts = torch.tensor(requests.num_tokens, dtype=torch.int64, device=device)  # [R]
        scored = self._scored_lists(meta)
        # A step holding prefill tokens gives vLLM's kernel every sequence: the scored
        # decode lists' rows (one query each) are attended twice, the second time by our
        # kernel, whose output overwrites the first; cheaper than copying the chunks'
        # query rows out and back around the kernel on every layer.
        prefill_step = total > num_reqs
        keep = None if prefill_step else self._unscored(scored, counts, total)  # [L, H, R] (None: all)
        lens, table, per_layer = self._gather_lists(requests.rows_t, keep, max(requests.width, 1))
        seq_tokens = counts.repeat(heads)  # [H * R], sequence s = h * R + i
        spans = self._span_lists(meta)
        if keep is None:
            seq_start = self._starts(seq_tokens)
            return NativePlan([NativeLayer(None, seq_start, lens_l, table_l, scored_l) for lens_l, table_l, scored_l
                               in zip(lens.split(per_layer), table.split(per_layer), scored)], spans)
        # head-major rows h * T + t of the kept sequences: (h, i, token of i) order is (h, t) order
        kept_rows = keep.reshape(layers, -1).repeat_interleave(seq_tokens, dim=1)  # [L, H * T]
        rows_per_layer = kept_rows.sum(1).tolist()
        query_rows = kept_rows.nonzero()[:, 1].split(rows_per_layer)
        seq_start = self._layer_starts(keep.reshape(layers, -1), seq_tokens, per_layer)
        return NativePlan([
            NativeLayer(query_rows[layer], seq_start[layer], lens_l, table_l, scored[layer])
            for layer, (lens_l, table_l) in enumerate(zip(lens.split(per_layer), table.split(per_layer)))], spans)

    def _unscored(self, scored: list, counts: torch.Tensor, total: int) -> torch.Tensor | None:
        """[L, H, R] bool: the (layer, head, request) sequences vLLM's kernel attends, i.e. all
        but the scored decode lists; None when no list is scored (every sequence)."""
        listed = [(layer, lists) for layer, lists in enumerate(scored) if lists is not None]
        if not listed:
            return None
        layers, heads = self.cache.shape[1], self.cache.shape[2]
        device = counts.device
        num_reqs = counts.numel()
        token_req = torch.repeat_interleave(torch.arange(num_reqs, device=device), counts, output_size=total)
        token = torch.cat([lists[0] for _, lists in listed])
        head = torch.cat([lists[2] for _, lists in listed])
        layer = torch.repeat_interleave(torch.tensor([layer for layer, _ in listed], device=device),
                                        torch.tensor([lists[0].numel() for _, lists in listed], device=device))
        keep = torch.ones(layers, heads, num_reqs, dtype=torch.bool, device=device)
        keep[layer, head, token_req[token]] = False
        return keep

    @staticmethod
    def _layer_starts(kept: torch.Tensor, seq_tokens: torch.Tensor, per_layer: list[int]) -> tuple:
        """Per layer, ``_starts`` of its kept sequences, from one cumsum over all layers.

        kept [L, H * R] bool, seq_tokens [H * R]; -> L int32 tensors [kept_l + 1] (views of one
        buffer): each layer's segment is a 0, then the running ends of its kept sequences.
        """
        layers = kept.shape[0]
        ends = torch.cumsum(seq_tokens * kept, dim=1)[kept]  # [sum kept_l], layer-major
        counts = torch.tensor(per_layer, device=kept.device)
        slot = torch.arange(ends.numel(), device=kept.device) + torch.repeat_interleave(
            torch.arange(1, layers + 1, device=kept.device), counts, output_size=ends.numel())
        starts = torch.zeros(ends.numel() + layers, dtype=torch.int32, device=kept.device)
        starts[slot] = ends.to(torch.int32)
        return starts.split([n + 1 for n in per_layer])

    def _span_lists(self, meta: StepMetadata):
        """``NativePlan.span_lists`` of the step (None: no span, or no C++ kernels)."""
        scoring = meta.scoring
        if not self.fused_scores or scoring is None or not scoring.spans:
            return None
        heads = self.cache.shape[2]
        spans = torch.tensor(scoring.spans, dtype=torch.int64, device=self.cache.device)  # [S, 3] (row, start, end)
        row, first, end = (c.repeat_interleave(heads) for c in spans.unbind(1))
        head = torch.arange(heads, device=spans.device).repeat(spans.shape[0])
        return first, end - first, row, head

    def _scored_lists(self, meta: StepMetadata) -> list:
        """Per layer, the (token, row, head) decode lists the fused kernel attends (or None)."""
        scoring = meta.scoring
        if not self.fused_scores or scoring is None or scoring.decode_lists is None:
            return [None] * self.cache.shape[1]
        return list(scoring.decode_lists)

    def _gather_lists(self, rows_t: torch.Tensor, keep: torch.Tensor | None, width: int):
        """(seq_lens [N] int32, table [N, width] int32, per-layer counts) of the kept sequences.

        Lists are flattened (layer, head, request), the order of ``keep``; one gather each
        from the page tables, into the step buffers.
        """
        max_reqs, layers, heads = self.cache.shape
        list_id = (rows_t * (layers * heads) + (torch.arange(layers, device=rows_t.device)[:, None] * heads
                   + torch.arange(heads, device=rows_t.device))[..., None])  # [L, H, R]
        if keep is None:
            per_layer = [heads * rows_t.numel()] * layers
            list_id = list_id.reshape(-1)
        else:
            per_layer = keep.reshape(layers, -1).sum(1).tolist()
            list_id = list_id[keep]
        count = list_id.numel()
        lens = torch.index_select(self.cache.lens.view(-1), 0, list_id,
                                  out=self.buffers.take("seq_lens", (count,), torch.int32))
        tables = self.cache.table.view(-1, self.cache.width)[:, :width]
        table = torch.index_select(tables, 0, list_id, out=self.buffers.take("table", (count, width), torch.int32))
        return lens, table, per_layer

    @staticmethod
    def _starts(seq_tokens: torch.Tensor) -> torch.Tensor:
        """[N + 1] int32 first query row of each sequence, then the end."""
        starts = torch.zeros(seq_tokens.numel() + 1, dtype=torch.int32, device=seq_tokens.device)
        torch.cumsum(seq_tokens, 0, dtype=torch.int32, out=starts[1:])
        return starts

    # --- per layer ----------------------------------------------------------------

    def compact(self, plan) -> None:
        """The C++ moves when built (the torch reference's scatter into the pool's strided
        views took seconds for one decode re-eviction in the engine)."""
        if not HAS_CPU_KERNELS:
            return super().compact(plan)
        pool = self.pool
        compact_slots_cpu(pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score, plan.src_slot,
                          plan.dst_slot, plan.num_moves, k_transposed=True)

    def write_kv(self, layer, k, v, meta) -> None:
        """The C++ write (one loop; the torch reference is a dozen indexing ops) when built."""
        if not HAS_CPU_KERNELS:
            return super().write_kv(layer, k, v, meta)
        pool, tokens = self.pool, meta.tokens
        write_kv_cpu(k, v, tokens.slot_mapping[layer], tokens.positions, tokens.flags, pool.kv_pages, pool.slot_pos,
                     pool.slot_flags, pool.slot_score, k_transposed=True)

    def attend(self, layer, q, out, meta, scale) -> None:
        """vLLM's kernel over the layer's unscored sequences, then ours over its scored decode lists.

        vLLM's kernel reads its query head-major, each sequence's rows contiguous: ``q``
        (a column slice of the fused qkv output, so its token rows are strided) is copied
        once into a head-major step buffer, and the layer's ``query_rows`` of it picked when
        some sequences go to our kernel instead. A sequence's keys are its list's first
        ``seq_len`` slots, the last ``num_tokens`` of which are this step's own tokens (causal
        by index). The output comes back the same way; the scored lists' rows, stale there,
        are then written by ``scored_decode_attention``.
        """
        num_tokens, _, head_dim = q.shape
        heads, group = self.cache.shape[2], self.query_group
        plan = meta.path.layers[layer]
        if plan.num_seqs:
            by_head = (heads, num_tokens, group, head_dim)
            rows = heads * num_tokens
            head_major = self.buffers.take("query", by_head, q.dtype)
            head_major.copy_(q.view(num_tokens, heads, group, head_dim).transpose(0, 1))
            query = head_major.view(rows, group, head_dim)
            if plan.query_rows is not None:
                query = torch.index_select(query, 0, plan.query_rows, out=self.buffers.take(
                    "query_rows", (plan.query_rows.numel(), group, head_dim), q.dtype))
            result = self.buffers.take("result", tuple(query.shape), q.dtype)
            self.kernel(query, self._keys, self._values, result, plan.seq_start, plan.seq_lens, plan.table, scale)
            if plan.query_rows is not None:
                result = self.buffers.take("out_rows", (rows, group, head_dim), q.dtype).index_copy_(
                    0, plan.query_rows, result)
            out.view(num_tokens, heads, group, head_dim).copy_(result.view(by_head).transpose(0, 1))
        if plan.scored is not None:
            token, row, head = plan.scored
            pool = self.pool
            scored_decode_attention(q, token, row, head, self.cache.table[:, layer], self.cache.lens[:, layer],
                                    meta.tokens.positions, pool.kv_pages, pool.slot_pos, out, pool.slot_score,
                                    scale)
        if meta.path.span_lists is not None:
            with self.timer.part("score_s"):
                score_rows(q, *meta.path.span_lists, self.cache.table[:, layer], self.cache.lens[:, layer],
                           meta.tokens.positions, self.pool.kv_pages, self.pool.slot_pos, self.pool.slot_score, scale)
        elif not self.fused_scores and meta.scoring is not None:  # torch: decode rows and spans
            with self.timer.part("score_s"):
                score_lists(self.pool, self.cache, layer, q, meta, scale)
