"""Worker-side engine state: the per-head page pool, one engine step at a time.

``HeadCacheRuntime`` is what an inference engine's worker drives; it knows
nothing of vLLM. One step::

    plan_step(requests, tokens)     allocate this step's slots in every head list
                                    -> StepMetadata (shared by every layer)
    attend(layer, q, k, v, out)     x L: write K/V, attention over the head lists,
                                    accumulate attention scores where a policy needs them
    finish_step(meta)               prompt complete -> profile + evict + compact;
                                    every ``block_size`` decode tokens -> re-evict;
                                    -> StepReport (pages held per request, for the scheduler)
    release(req_ids)                finish / abort / preemption: every page back at once

Rows: each live request owns one row of the page tables (``PagedHeadCache``).

Scores: a slot's score is the attention it received from the request's
*observation rows*: prompt positions ``>= prompt_len - observation_window`` and
every later token. At the prompt's end these are exactly the window column sums
FastGen profiling needs (``profile_window``); afterwards they keep accumulating
for the frequent / heavy-hitter components.

Decode-time eviction is lazy: a request's lists are re-evicted every
``block_size`` tokens after its prompt, so a head may hold up to one page of
tokens its policy would already have dropped (the approximation of DESIGN.md 4).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from .config import KVPolicyConfig, parse_policy_config
from .layout import KVPool
from .paging import PagedHeadCache
from .policies import FastGen, SlotView
from .profiler import FastGenProfiler
from .timing import StepTimer
from .triton_kernels.compaction import compact_slots
from .triton_kernels.paged_attention import paged_attention
from .triton_kernels.write_kv import write_kv

SCORING_POLICIES = ("fastgen", "h2o", "snapkv")

# Bound on the fp32 elements of one prefill attention block on the torch path
# ([H, G, tokens, slots] logits); longer chunks are split over their tokens.
_PREFILL_BLOCK_ELEMS = 1 << 25


@dataclass
class RowState:
    """Host-side facts of one live request (all known without reading the device)."""

    req_id: str
    config: KVPolicyConfig
    prompt_len: int
    tokens: int = 0  # tokens written to its lists so far (before eviction)
    profiled: bool = False  # prompt-end eviction done
    since_evict: int = 0  # tokens appended since the last eviction
    longest: int = 0  # slots of its longest list (host bound, exact after each report)
    # [L, H] bool: lists whose decode tokens accumulate scores (None = all of them).
    # FastGen narrows it at prompt end to heads whose rung uses frequent tokens.
    score_heads: torch.Tensor | None = None

    @property
    def window_start(self) -> int:
        return max(0, self.prompt_len - self.config.observation_window)

    @property
    def needs_scores(self) -> bool:
        return self.config.name in SCORING_POLICIES


@dataclass
class StepMetadata:
    """Device tensors of one step, shared by every layer (T tokens, R requests).

    token_row     [T] int32  page-table row of each token's request
    positions     [T] int32  original positions
    flags         [T] uint8  token-class bits
    slot_mapping  [L, T, H] int64 slot of token t in list (row, l, h)
    score_weight  [T] fp32 or None (None: no request of the step accumulates scores)
    decode_index  [Td] int64 tokens of one-token requests; decode_rows [Td] their rows
    prefill_spans (row, start, end) of requests with several tokens (host ints)
    width         page-table columns any list of the step can use (host bound)

    With a native attention op (``HeadCacheRuntime(native_attention=...)``) each
    (kv head h, request i) pair is one sequence ``s = h * R + i`` of the op:

    seq_start     [H*R + 1] int32  first query row of sequence s in the head-major
                  query ``q.view(T, H, G, D).transpose(0, 1)``, i.e. h * T + start_i
    score_decode  per layer: (token [N], row [N], head [N]) lists of one-token
                  requests that accumulate scores at that layer, or None
    score_spans   (row, start, end) token ranges of longer requests that do
    """

    req_ids: list[str]
    rows: list[int]
    num_tokens: list[int]
    token_row: torch.Tensor
    positions: torch.Tensor
    flags: torch.Tensor
    slot_mapping: torch.Tensor
    score_weight: torch.Tensor | None
    decode_index: torch.Tensor
    decode_rows: torch.Tensor
    prefill_spans: list[tuple[int, int, int]]
    width: int
    rows_t: torch.Tensor | None = None
    seq_start: torch.Tensor | None = None
    score_decode: list | None = None
    score_spans: list[tuple[int, int, int]] = field(default_factory=list)


PROFILE_HISTORY = 1024  # per-head policy maps kept for inspection


@dataclass
class StepReport:
    """What the scheduler needs after a step; plain Python values (picklable).

    requests: req_id -> (pages_held, lists_with_full_last_page, slots_held, tokens)
    timings: seconds per part (vllm_adaptive_kv.timing), empty unless timing is on
    """

    requests: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    evicted_tokens: int = 0
    head_policy_counts: dict[str, int] = field(default_factory=dict)
    pages_free: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class HeadCacheRuntime:
    """The pool, the page tables and the policies of one worker (one TP rank)."""

    def __init__(
        self,
        pool: KVPool,
        num_layers: int,
        num_kv_heads: int,
        query_group: int,
        max_reqs: int,
        max_model_len: int,
        token_flags: torch.Tensor,
        default_settings: dict,
        impl: str = "auto",
        native_attention=None,
    ) -> None:
        """``native_attention``: an optional op that runs attention over paged
        sequences on CPU (``plugin.cpu_attention.VllmCpuPagedAttention`` wraps
        vLLM's kernel); it needs a pool with ``k_transposed``. Without it the CPU
        path is vectorized torch."""
        if native_attention is not None and not pool.k_transposed:
            raise ValueError("native_attention reads K blocks stored [D, bs]: build the pool with k_transposed=True")
        self.pool = pool
        self.query_group = query_group  # query heads per kv head
        self.block_size = pool.block_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        width = -(-max_model_len // pool.block_size) + 1
        self.cache = PagedHeadCache(pool.num_pages, pool.block_size, num_layers, num_kv_heads,
                                    width, max_reqs, device=pool.kv_pages.device)
        self.choice = torch.zeros(max_reqs, num_layers, num_kv_heads, dtype=torch.int64,
                                  device=pool.kv_pages.device)
        self.token_flags = token_flags.to(pool.kv_pages.device)
        self.default_settings = dict(default_settings)
        self.default_config = parse_policy_config(self.default_settings)
        # "auto" picks per device once: Triton on CUDA, torch elsewhere (never the
        # Triton interpreter inside an engine, even if TRITON_INTERPRET is set).
        self.impl = impl if impl != "auto" else ("triton" if pool.kv_pages.is_cuda else "torch")
        self.native_attention = native_attention
        # [P, 1, bs, D] views of the K / V blocks: one KV head per (list) sequence
        self._native_k = pool.kv_pages[:, 0].unsqueeze(1)
        self._native_v = pool.kv_pages[:, 1].unsqueeze(1)
        self.rows: dict[str, int] = {}
        self.state: dict[int, RowState] = {}
        self._free_rows = list(range(max_reqs - 1, -1, -1))
        self._evicted = torch.zeros((), dtype=torch.int64, device=pool.kv_pages.device)
        self._decisions: Counter = Counter()
        # req_id -> [layer][kv_head] FastGen policy name chosen at prompt end; the
        # most recent PROFILE_HISTORY requests, for policy-map plots and audits.
        self.head_policies: OrderedDict[str, list[list[str]]] = OrderedDict()
        # Opt-in timing of the attention-score accumulation (the worker swaps in its timer).
        self.timer = StepTimer()

    # --- requests ------------------------------------------------------------

    def check_add(self, req_id: str) -> None:
        if req_id in self.rows:
            raise ValueError(f"request {req_id!r} is already live")
        if not self._free_rows:
            raise RuntimeError(f"no free request row: all {self.cache.shape[0]} rows are live")

    def add(self, req_id: str, prompt_len: int, config: KVPolicyConfig | None = None) -> int:
        """Give a request a row; ``config`` None = the runtime's default policy."""
        self.check_add(req_id)
        row = self._free_rows.pop()
        self.rows[req_id] = row
        self.state[row] = RowState(req_id, config or self.default_config, int(prompt_len))
        return row

    def release(self, req_ids) -> None:
        """Return every page of these requests (unknown ids are ignored)."""
        rows = [self.rows.pop(r) for r in req_ids if r in self.rows]
        if not rows:
            return
        self.cache.release(torch.tensor(rows, dtype=torch.int64, device=self.cache.device))
        for row in rows:
            del self.state[row]
            self._free_rows.append(row)

    # --- one step ---------------------------------------------------------------

    def plan_step(self, req_ids: list[str], num_tokens: list[int], positions: torch.Tensor,
                  token_ids: torch.Tensor) -> StepMetadata:
        """Allocate slots for ``num_tokens[i]`` new tokens of each (live) request.

        positions / token_ids: [T] for the step's tokens, requests in ``req_ids`` order.
        """
        device = self.cache.device
        rows = [self.rows[r] for r in req_ids]
        total = int(sum(num_tokens))
        rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        counts = torch.tensor(num_tokens, dtype=torch.int64, device=device)
        slot_mapping = self.cache.allocate(rows_t, counts, total, max(num_tokens, default=0))
        token_row = torch.repeat_interleave(rows_t, counts, output_size=total).to(torch.int32)
        positions = positions[:total].to(torch.int32)
        flags = self.token_flags[token_ids[:total].long().clamp(0, self.token_flags.numel() - 1)]
        states = [self.state[r] for r in rows]
        meta = StepMetadata(
            req_ids=list(req_ids), rows=rows, num_tokens=list(num_tokens),
            token_row=token_row, positions=positions, flags=flags, slot_mapping=slot_mapping,
            score_weight=self._score_weight(states, counts, positions, token_row),
            decode_index=torch.empty(0, dtype=torch.int64, device=device),
            decode_rows=torch.empty(0, dtype=torch.int64, device=device),
            prefill_spans=[], width=0,
        )
        self._split_decode_prefill(meta, states)
        if self.native_attention is not None:
            self._plan_native(meta, rows_t, states, total)
        for st, n in zip(states, num_tokens):
            st.tokens += n
            st.longest += n
            if st.profiled:
                st.since_evict += n
        meta.width = min(self.cache.width, -(-max((s.longest for s in states), default=0) // self.block_size))
        return meta

    def _score_weight(self, states, counts, positions, token_row) -> torch.Tensor | None:
        """1 for observation rows of scoring requests, else 0; None if nobody scores."""
        if not any(s.needs_scores for s in states):
            return None
        device = positions.device
        starts = torch.tensor([s.window_start if s.needs_scores else 1 << 30 for s in states],
                              dtype=torch.int32, device=device)
        per_token = torch.repeat_interleave(starts, counts, output_size=positions.numel())
        return (positions >= per_token).to(torch.float32)

    def _split_decode_prefill(self, meta: StepMetadata, states) -> None:
        """The torch path batches one-token requests and runs longer ones one by one."""
        decode, decode_rows, start = [], [], 0
        for row, n in zip(meta.rows, meta.num_tokens):
            if n == 1:
                decode.append(start)
                decode_rows.append(row)
            elif n > 1:
                meta.prefill_spans.append((row, start, start + n))
            start += n
        device = self.cache.device
        meta.decode_index = torch.tensor(decode, dtype=torch.int64, device=device)
        meta.decode_rows = torch.tensor(decode_rows, dtype=torch.int64, device=device)

    def _plan_native(self, meta: StepMetadata, rows_t, states, total: int) -> None:
        """Sequence starts for the native op, and which tokens accumulate scores."""
        device = rows_t.device
        starts, start = [], 0
        decode, decode_heads = [], []
        for row, n, st in zip(meta.rows, meta.num_tokens, states):
            starts.append(start)
            # st.tokens is still the position of this step's first token.
            first = start + max(0, st.window_start - st.tokens)
            if st.needs_scores and first < start + n:
                if n == 1:
                    decode.append((start, row))
                    decode_heads.append(st.score_heads)
                else:
                    meta.score_spans.append((row, first, start + n))
            start += n
        heads = torch.arange(self.num_kv_heads, dtype=torch.int64)[:, None] * total
        seq_start = (heads + torch.tensor(starts, dtype=torch.int64)).reshape(-1).tolist() + [
            self.num_kv_heads * total]
        meta.rows_t = rows_t
        meta.seq_start = torch.tensor(seq_start, dtype=torch.int32, device=device)
        meta.score_decode = self._decode_score_lists(decode, decode_heads, device)

    def _decode_score_lists(self, decode, decode_heads, device) -> list:
        """Per layer, the (token, row, head) lists whose decode token is scored.

        decode: (token index, row) of one-token scoring requests; decode_heads:
        their ``score_heads`` masks. Lists are grouped by layer::

            mask [Rd, L, H] -> nonzero of [L, Rd, H] -> (layer, i, head), layer-sorted
        """
        per_layer: list = [None] * self.num_layers
        if not decode:
            return per_layer
        full = torch.ones(self.num_layers, self.num_kv_heads, dtype=torch.bool)
        mask = torch.stack([full if m is None else m for m in decode_heads]).transpose(0, 1)
        layer, item, head = mask.nonzero(as_tuple=True)
        tokens = torch.tensor([t for t, _ in decode], dtype=torch.int64)[item]
        rows = torch.tensor([r for _, r in decode], dtype=torch.int64)[item]
        counts = mask.sum(dim=(1, 2)).tolist()
        for lay, tok, row, hd in zip(range(self.num_layers), tokens.split(counts), rows.split(counts),
                                     head.split(counts)):
            if tok.numel():
                per_layer[lay] = (tok.to(device), row.to(device), hd.to(device))
        return per_layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor, meta: StepMetadata, scale: float) -> torch.Tensor:
        """Write this layer's K/V of the step, then attention of every query.

        q [T, Hq, D], k / v [T, H, D], out [T, Hq, D] (written).
        """
        pool = self.pool
        write_kv(k, v, meta.slot_mapping[layer], meta.positions, meta.flags, pool.kv_pages,
                 pool.slot_pos, pool.slot_flags, pool.slot_score, impl=self.impl,
                 k_transposed=pool.k_transposed)
        score = pool.slot_score if meta.score_weight is not None else None
        if self.native_attention is not None:
            self._attend_native(layer, q, out, meta, scale)
            if score is not None:
                with self.timer.part("score_s"):
                    self._score_native(layer, q, meta, scale, score)
            return out
        if self._use_kernels():
            return paged_attention(q, meta.token_row, meta.positions, self.cache.table[:, layer],
                                   self.cache.lens[:, layer], pool.kv_pages, pool.slot_pos, scale,
                                   out=out, slot_score=score, score_weight=meta.score_weight,
                                   impl="triton")
        self._attend_decode_torch(layer, q, out, meta, scale, score)
        for row, start, end in meta.prefill_spans:
            weight = meta.score_weight[start:end] if score is not None else None
            out[start:end] = self._attend_prefill_torch(layer, row, q[start:end],
                                                        meta.positions[start:end], meta.width,
                                                        scale, score, weight)
        return out

    def _attend_native(self, layer, q, out, meta: StepMetadata, scale: float) -> None:
        """All of the step's queries in one call of the native op (see StepMetadata).

        Query rows are regrouped head-major so each (head, request) sequence is
        contiguous; its keys are the list's first ``seq_len`` slots, the last
        ``num_tokens`` of which are this step's own tokens (causal by index).
        """
        num_tokens, num_q_heads, head_dim = q.shape
        heads, group = self.num_kv_heads, self.query_group
        query = q.view(num_tokens, heads, group, head_dim).transpose(0, 1).reshape(-1, group, head_dim)
        result = torch.empty_like(query)
        rows = meta.rows_t
        seq_lens = self.cache.lens[rows, layer].t().reshape(-1)  # [H*R] int32
        table = self.cache.table[rows, layer, :, :max(meta.width, 1)].transpose(0, 1).reshape(
            heads * rows.numel(), -1)
        self.native_attention(query, self._native_k, self._native_v, result, meta.seq_start,
                              seq_lens, table, scale)
        out.view(num_tokens, heads, group, head_dim).copy_(
            result.view(heads, num_tokens, group, head_dim).transpose(0, 1))

    def _score_native(self, layer, q, meta: StepMetadata, scale: float, score) -> None:
        """Scores of the observation rows only (the native op returns no probabilities)."""
        width = max(meta.width, 1)
        num_tokens, _, head_dim = q.shape
        by_head = q.view(num_tokens, self.num_kv_heads, self.query_group, head_dim)
        if meta.score_decode[layer] is not None:
            token, row, head = meta.score_decode[layer]
            lens = self.cache.lens[row, layer, head]
            # Scored lists are compressed ones, often far shorter than the step's
            # longest list: gather only their own width (a host read, free on CPU,
            # the only device this native path runs on).
            own = max(1, -(-int(lens.max()) // self.block_size))
            self._score_lists(by_head[token, head][:, None], self.cache.table[row, layer, head, :min(width, own)],
                              lens, scale, score, pool_dtype_logits=True)
        for row, start, end in meta.score_spans:
            self._score_lists(by_head[start:end].transpose(0, 1), self.cache.table[row, layer, :, :width],
                              self.cache.lens[row, layer], scale, score)

    def _use_kernels(self) -> bool:
        return self.impl == "triton"

    def _attend_decode_torch(self, layer, q, out, meta, scale, score) -> None:
        """One-token requests, batched: gather whole pages of their lists once."""
        index = meta.decode_index
        if index.numel() == 0:
            return
        rows = meta.decode_rows
        weight = meta.score_weight[index] if score is not None else None
        out[index] = self._attend_lists(layer, rows, q[index][:, None], meta.positions[index][:, None],
                                        max(meta.width, 1), scale, score,
                                        weight[:, None] if weight is not None else None)[:, 0]

    def _attend_prefill_torch(self, layer, row, q, q_pos, width, scale, score, weight):
        """One request's chunk of t tokens, split so the logits stay bounded."""
        rows = torch.tensor([row], dtype=torch.int64, device=q.device)
        num_slots = max(1, width * self.block_size)
        step = max(1, _PREFILL_BLOCK_ELEMS // (q.shape[1] * num_slots))
        out = torch.empty_like(q)
        for lo in range(0, q.shape[0], step):
            hi = min(lo + step, q.shape[0])
            w = weight[None, lo:hi] if weight is not None else None
            out[lo:hi] = self._attend_lists(layer, rows, q[None, lo:hi], q_pos[None, lo:hi], width,
                                            scale, score, w)[0]
        return out

    def _attend_lists(self, layer, rows, q, q_pos, width, scale, score, weight):
        """Dense masked attention of ``t`` queries per request over its gathered lists.

        rows [R], q [R, t, Hq, D], q_pos [R, t], weight [R, t] or None -> [R, t, Hq, D].
        K and V are gathered page by page (``[R, H, Wb, bs, D]`` each, contiguous
        copies of whole pages), which is much cheaper than addressing slot by slot.
        Probabilities are materialized only for rows that accumulate scores.
        """
        num_reqs, t, num_q_heads, head_dim = q.shape
        page, keys, key_pos, in_list = self._gather_keys(layer, rows, width)
        num_heads = page.shape[1]
        group = num_q_heads // num_heads
        values = self.pool.v_pages[page].reshape(num_reqs, num_heads, -1, head_dim)
        values = values.masked_fill(~in_list[..., None], 0.0)  # unlisted slots may hold NaN
        visible = in_list[:, :, None, :] & (key_pos[:, :, None, :] <= q_pos[:, None, :, None])  # [R,H,t,S]
        qg = q.view(num_reqs, t, num_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # [R,H,G,t,D]
        mask = visible[:, :, None].expand(-1, -1, group, -1, -1)
        attn = torch.nn.functional.scaled_dot_product_attention(
            qg.reshape(num_reqs, num_heads, group * t, head_dim).to(keys.dtype), keys, values,
            attn_mask=mask.reshape(num_reqs, num_heads, group * t, -1), scale=scale)
        if score is not None:
            self._accumulate_scores(qg, keys, visible, weight, page, scale, score)
        attn = attn.view(num_reqs, num_heads, group, t, head_dim).permute(0, 3, 1, 2, 4)
        return attn.reshape(num_reqs, t, num_q_heads, head_dim).to(q.dtype)

    def _gather_keys(self, layer, rows, width):
        """The first ``width`` pages of the lists of ``rows`` at ``layer``.

        -> page [R, H, Wb] (int64), keys [R, H, S, D], key_pos [R, H, S] and
        in_list [R, H, S] (slot holds a listed token), S = Wb * bs.
        """
        num_reqs = rows.numel()
        page = self.cache.table[rows, layer, :, :width].long().clamp_min(0)  # [R, H, Wb]
        num_heads = page.shape[1]
        in_list = torch.arange(width * self.block_size, device=page.device) < self.cache.lens[rows, layer][..., None]
        keys = self.pool.k_pages[page].reshape(num_reqs, num_heads, -1, self.pool.head_dim)
        key_pos = self.pool.slot_pos[page].reshape(num_reqs, num_heads, -1)
        return page, keys, key_pos, in_list

    def _score_lists(self, q, page, lens, scale, score, pool_dtype_logits: bool = False) -> None:
        """score[slot] += attention that the last ``t`` tokens of each list pay to it.

        q [N, t, G, D]: the queries of N lists' last t entries (all weighted);
        page [N, Wb] their page tables, lens [N] their lengths. Causality is by
        list index, so slot positions are not read::

            query i of t sees list slots j < len - (t - 1 - i)

        K blocks are gathered in storage order and multiplied as stored, so the
        transposed layout needs no transposing copy:
        ``[N, 1, t*G, D] @ [N, Wb, D, bs] -> [N, Wb, t*G, bs]``.

        ``pool_dtype_logits`` (decode tokens): the logits come from a matmul in the
        pool's dtype (float32 accumulation inside each dot product, the result
        rounded to it, e.g. bf16), sparing a float32 copy of every gathered K
        block, the dominant cost of decode scoring on CPU. The softmax and the
        accumulated scores stay float32. Prompt-end profiling keeps float32 logits.
        """
        num_lists, t, group, head_dim = q.shape
        page = page.long().clamp_min(0)
        blocks = self.pool.kv_pages[:, 0][page]  # [N, Wb, bs, D]: copies of the raw K blocks
        keys_t = blocks.view(*page.shape, head_dim, -1) if self.pool.k_transposed else blocks.transpose(-1, -2)
        qg = q.reshape(num_lists, 1, t * group, head_dim)
        if pool_dtype_logits:
            logits = torch.matmul(qg.to(keys_t.dtype), keys_t).float()
        else:
            logits = torch.matmul(qg.float(), keys_t.float())
        logits = logits.transpose(1, 2).reshape(num_lists, t * group, -1)
        limit = lens.long()[:, None] - (t - 1 - torch.arange(t, device=q.device))  # [N, t]
        visible = torch.arange(logits.shape[-1], device=q.device) < limit.repeat_interleave(group, dim=1)[..., None]
        logits.mul_(scale).masked_fill_(~visible, float("-inf"))
        col = torch.softmax(logits, dim=-1).sum(1)  # [N, S]
        score.view(-1).index_put_((self._slot_ids(page),), col.reshape(-1), accumulate=True)

    def _accumulate_scores(self, qg, keys, visible, weight, page, scale, score) -> None:
        """score[slot] += sum over the group and the weighted rows of the probabilities.

        Only rows with weight > 0 matter; for a long prompt chunk these are the
        observation window, so the chunk's other rows are skipped (host-known
        bound: the last ``observation_window`` rows at most, or every row).
        """
        if weight.shape[1] > 1:
            rows = weight.gt(0).any(0)  # [t] rows some request weights
            qg, visible, weight = qg[:, :, :, rows], visible[:, :, rows], weight[:, rows]
        if qg.shape[3] == 1:  # decode: logits in the pool's dtype, as _score_lists does
            logits = torch.matmul(qg.to(keys.dtype), keys.transpose(-1, -2)[:, :, None]).float() * scale
        else:
            logits = torch.matmul(qg.float(), keys.float().transpose(-1, -2)[:, :, None]) * scale  # [R,H,G,t,S]
        logits.masked_fill_(~visible[:, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        col = (probs.sum(2) * weight[:, None, :, None]).sum(2)  # [R, H, S]
        score.view(-1).index_put_((self._slot_ids(page),), col.reshape(-1), accumulate=True)

    def _slot_ids(self, page: torch.Tensor) -> torch.Tensor:
        """Flat slot ids of every slot of pages [..., Wb] -> [... * Wb * bs] int64."""
        offs = torch.arange(self.block_size, device=page.device)
        return (page[..., None] * self.block_size + offs).reshape(-1)

    # --- after the forward pass -----------------------------------------------------

    def finish_step(self, meta: StepMetadata) -> StepReport:
        """Evict where due, then report what every request of the step holds."""
        due_prompt = [r for r in meta.rows if not self.state[r].profiled
                      and self.state[r].tokens >= self.state[r].prompt_len]
        due_decode = [r for r in meta.rows if self.state[r].profiled
                      and self.state[r].since_evict >= self.block_size]
        if due_prompt:
            self._evict(due_prompt, at_prompt_end=True)
        if due_decode:
            self._evict(due_decode, at_prompt_end=False)
        for r in due_prompt:
            self.state[r].profiled = True
        for r in due_prompt + due_decode:
            self.state[r].since_evict = 0
        return self._report(meta)

    def _report(self, meta: StepMetadata) -> StepReport:
        rows = torch.tensor(meta.rows, dtype=torch.int64, device=self.cache.device)
        lens = self.cache.lens[rows].to(torch.int64)  # [R, L, H]
        bs = self.block_size
        held = ((lens + bs - 1) // bs).sum(dim=(1, 2))
        full_last = (lens % bs == 0).sum(dim=(1, 2))
        slots = lens.sum(dim=(1, 2))
        longest = lens.amax(dim=(1, 2))
        per_req = torch.stack([held, full_last, slots, longest]).T.tolist()  # the step's one host read
        extra = torch.stack([self._evicted, self.cache.num_free.reshape(())]).tolist()
        self._evicted.zero_()
        report = StepReport(evicted_tokens=int(extra[0]), pages_free=int(extra[1]),
                            head_policy_counts=dict(self._decisions))
        self._decisions.clear()
        for req_id, row, (held, full_last, slots, longest) in zip(meta.req_ids, meta.rows, per_req):
            self.state[row].longest = longest
            report.requests[req_id] = (held, full_last, slots, self.state[row].tokens)
        return report

    def _evict(self, rows: list[int], at_prompt_end: bool) -> None:
        """Apply each request's policy to its lists and compact them (batched per policy)."""
        groups: dict[KVPolicyConfig, list[int]] = {}
        for r in rows:
            groups.setdefault(self.state[r].config, []).append(r)
        for config, group_rows in groups.items():
            if config.name == "full":
                if at_prompt_end:
                    self._decisions["full"] += len(group_rows) * self.num_layers * self.num_kv_heads
                continue
            self._evict_group(config, group_rows, at_prompt_end)

    def _evict_group(self, config: KVPolicyConfig, rows: list[int], at_prompt_end: bool) -> None:
        device = self.cache.device
        rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        num_slots = max(self.state[r].tokens for r in rows)
        view = self._slot_view(rows_t, [self.state[r].tokens for r in rows], num_slots)
        keep = self._keep_mask(config, rows, rows_t, view, at_prompt_end)
        before = self.cache.lens[rows_t].to(torch.int64).sum()
        plan = self.cache.plan_compaction(rows_t, keep.view(len(rows), self.num_layers,
                                                            self.num_kv_heads, num_slots))
        pool = self.pool
        compact_slots(pool.kv_pages, pool.slot_pos, pool.slot_flags, pool.slot_score,
                      plan.src_slot, plan.dst_slot, plan.num_moves, impl=self.impl,
                      k_transposed=pool.k_transposed)
        self.cache.commit_compaction(plan)
        self._evicted += before - plan.new_lens.to(torch.int64).sum()

    def _keep_mask(self, config, rows, rows_t, view: SlotView, at_prompt_end: bool) -> torch.Tensor:
        policy = config.policy
        if not isinstance(policy, FastGen):
            if at_prompt_end:
                self._decisions[config.name] += view.lengths.numel()
            return policy.keep_mask(view)
        shape = (len(rows), self.num_layers, self.num_kv_heads)
        if not at_prompt_end:
            return policy.keep_mask(view, self.choice[rows_t].reshape(-1))
        group_rows = torch.tensor(
            [self.state[r].tokens - self.state[r].window_start for r in rows],
            dtype=torch.int64, device=rows_t.device)
        window_rows = (group_rows * self.query_group)[:, None].expand(shape[0], shape[1] * shape[2])
        profile = FastGenProfiler(policy).profile_window(view, view.scores, window_rows.reshape(-1))
        self.choice[rows_t] = profile.choice.view(shape)
        scored = torch.tensor([i for i, name in enumerate(FastGen.ladder) if "frequent" in name])
        for row, choice in zip(rows, profile.choice.view(shape).cpu()):
            self.state[row].score_heads = torch.isin(choice, scored)
        self._record_head_policies(rows, profile.choice.view(shape).tolist())
        counts = torch.bincount(profile.choice, minlength=len(FastGen.ladder)).tolist()
        for name, count in zip(FastGen.ladder, counts):
            if count:
                self._decisions[name] += count
        return profile.keep

    def _record_head_policies(self, rows: list[int], choice: list) -> None:
        for row, per_layer in zip(rows, choice):
            names = [[FastGen.ladder[c] for c in heads] for heads in per_layer]
            self.head_policies[self.state[row].req_id] = names
        while len(self.head_policies) > PROFILE_HISTORY:
            self.head_policies.popitem(last=False)

    def _slot_view(self, rows_t: torch.Tensor, tokens: list[int], num_slots: int) -> SlotView:
        """SlotView of every list of ``rows_t``, flattened (row, layer, head), N = num_slots."""
        bs, pool = self.block_size, self.pool
        logical = torch.arange(num_slots, device=rows_t.device)
        table = self.cache.table[rows_t]  # [R, L, H, W]
        page = table[..., logical // bs].long().clamp_min(0)  # [R, L, H, N]
        offset = (logical % bs).expand_as(page)
        per_row = self.num_layers * self.num_kv_heads
        seq_len = torch.tensor(tokens, dtype=torch.int64, device=rows_t.device)
        return SlotView(
            flags=pool.slot_flags[page, offset].reshape(-1, num_slots),
            positions=pool.slot_pos[page, offset].reshape(-1, num_slots).to(torch.int64),
            scores=pool.slot_score[page, offset].reshape(-1, num_slots),
            lengths=self.cache.lens[rows_t].reshape(-1).to(torch.int64),
            seq_len=seq_len.repeat_interleave(per_row),
        )

    # --- checks -------------------------------------------------------------------------

    def pages_in_use(self) -> int:
        return self.cache.num_pages - int(self.cache.num_free)
