"""Worker-side engine state: the per-head page pool, one engine step at a time.

``HeadCacheRuntime`` is what an inference engine's worker drives; it knows
nothing of vLLM. It does the step's bookkeeping and hands attention to the
``AttentionPath`` chosen at start-up (``core/attention.py``). One step::

    plan_step(requests, tokens)     check the free stack can serve the step (check_plan),
                                    then allocate its slots in every head list
                                    -> StepMetadata (core/step.py; shared by every layer)
    attend(layer, q, k, v, out)     x L: write K/V, then the attention path (which
                                    also adds observation rows' attention to the scores)
    finish_step(meta)               prompt complete -> profile + evict + compact;
                                    a prompt chunk's end with ``compress_by_chunk``
                                    -> the same, without settling rungs;
                                    every ``block_size`` decode tokens -> re-evict;
                                    -> StepReport (a RequestReport per request, for the scheduler)
    release(req_ids)                finish / abort / preemption: every page back at once

Rows: each live request owns one row of the page tables (``PagedHeadCache``).

Scores: a slot's score is the attention it received from the request's
*observation rows*: prompt positions ``>= prompt_len - observation_window`` and
every later token (``StepScoring``); with ``compress_by_chunk``, also the last
``observation_window`` rows of each prompt chunk that ends in an eviction
(``RowState.chunk_end``; scores restart after it). At the prompt's end these are exactly the
window column sums FastGen profiling needs; afterwards they keep accumulating
for the frequent / heavy-hitter components. Only requests whose policy declares
``needs_scores`` accumulate, and only in the lists of ``score_lists`` (a persistent
[max_reqs, L, H] device mask): every list of such a request during its prompt (the
profiler reads all heads), then, for a policy that chooses per head, only the
lists ``scores_needed`` names. The dense paths pass its layer view to the kernels;
the list-by-list path reads the same choice from ``RowState.score_heads``.

Decode-time eviction is lazy: a request's lists are re-evicted every
``block_size`` tokens after its prompt, so a head may hold up to one page of
tokens its policy would already have dropped (docs/design.md, "Eviction"). A
re-eviction visits only ``RowState.evict_lists`` (lists whose rung can drop a
token), over ``longest_evictable`` slots.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from .attention import AttentionPath
from .config import KVPolicyConfig, parse_policy_config
from .layout import KVPool
from .paging import PagedHeadCache
from .policies import SlotView
from .profiler import FastGenProfiler
from .step import RequestReport, StepMetadata, StepReport, StepRequests, StepScoring, StepTokens

PROFILE_HISTORY = 1024  # per-head policy maps kept for inspection


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
    # The lists a decode re-eviction visits (flat list ids on the pool's device; those
    # whose rung can drop a token) and the slots of the longest of them (host bound like
    # ``longest``). A per-head policy narrows them at the prompt's end.
    evict_lists: torch.Tensor | None = None
    longest_evictable: int = 0
    # Its lists at the last report: pages held, and lists whose next token opens a page
    # (last page full, or empty). ``reported`` is False from a plan to its report:
    # meanwhile the lists grew and these two are stale.
    pages_held: int = 0
    full_lists: int = 0
    reported: bool = True
    # [L, H] bool: lists whose decode tokens accumulate scores (None = all of them).
    # A policy that chooses per head narrows it at the prompt's end (``scores_needed``).
    score_heads: torch.Tensor | None = None
    chunk_end: bool = False  # its latest step ends in a chunk eviction (compress_by_chunk)

    @property
    def window_start(self) -> int:
        return max(0, self.prompt_len - self.config.observation_window)

    def ends_chunk(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` from ``tokens`` (planned before the state counts
        it) ends in a chunk eviction: ``compress_by_chunk``, a whole window of the chunk's
        own rows to profile on, and done before the prompt's last window begins, so the
        prompt's end still profiles on its full window::

            prompt 0 ..................................... P-W ....... P
            chunk  [tokens ....... end)                     |
                           [end-W, end)  observed           end <= P-W, num_tokens >= W
        """
        w = self.config.observation_window
        return self.config.compress_by_chunk and num_tokens >= w and self.tokens + num_tokens <= self.window_start

    def observation_start(self, num_tokens: int) -> int:
        """First observation row of a step of ``num_tokens`` from ``tokens`` (see ``ends_chunk``)."""
        if self.ends_chunk(num_tokens):
            return self.tokens + num_tokens - self.config.observation_window
        return self.window_start

    def profile_rows(self) -> int:
        """Observation rows behind the slot scores at a chunk or prompt end (after the step)."""
        return self.config.observation_window if self.chunk_end else self.tokens - self.window_start

    @property
    def needs_scores(self) -> bool:
        return self.config.policy.needs_scores


class HeadCacheRuntime:
    """The pool, the page tables and the policies of one worker (one TP rank)."""

    def __init__(self, pool: KVPool, num_layers: int, num_kv_heads: int, query_group: int, max_reqs: int,
                 max_model_len: int, token_flags: torch.Tensor, default_settings: dict,
                 attention: AttentionPath) -> None:
        self.pool = pool
        self.query_group = query_group  # query heads per kv head
        self.block_size = pool.block_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        device = pool.kv_pages.device
        width = -(-max_model_len // pool.block_size) + 1
        self.cache = PagedHeadCache(pool.num_pages, pool.block_size, num_layers, num_kv_heads,
                                    width, max_reqs, device=device)
        self.attention = attention
        attention.bind(pool, self.cache, query_group)
        self.choice = torch.zeros(max_reqs, num_layers, num_kv_heads, dtype=torch.int64, device=device)
        # Lists whose observation rows add to the slot scores (StepScoring.lists); set per
        # request by ``add`` and narrowed at the prompt's end; device-side, never read back.
        self.score_lists = torch.zeros(max_reqs, num_layers, num_kv_heads, dtype=torch.bool, device=device)
        # Lists a decode re-eviction visits (RowState.evict_lists as a mask, for the report).
        self.evictable = torch.zeros(max_reqs, num_layers, num_kv_heads, dtype=torch.bool, device=device)
        self.token_flags = token_flags.to(device)
        self.default_settings = dict(default_settings)
        self.default_config = parse_policy_config(self.default_settings)
        self.rows: dict[str, int] = {}
        self.state: dict[int, RowState] = {}
        self._free_rows = list(range(max_reqs - 1, -1, -1))
        # A host lower bound of cache.num_free (see check_plan): exact at each report,
        # raised by releases, lowered by each step's bound on the pages it takes.
        self._free_floor = pool.num_pages
        self._evicted = torch.zeros((), dtype=torch.int64, device=device)
        self._decisions: Counter = Counter()
        self.chunk_evictions = 0  # (request, prompt chunk) evictions short of a prompt's end, ever
        # req_id -> [layer][kv_head] policy name chosen at prompt end (policies that
        # choose per head); the most recent PROFILE_HISTORY requests, for plots and audits.
        self.head_policies: OrderedDict[str, list[list[str]]] = OrderedDict()

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
        lists = self.num_layers * self.num_kv_heads
        state = RowState(req_id, config or self.default_config, int(prompt_len), full_lists=lists)
        self.state[row] = state
        # Every list scores through the prompt: profiling reads all heads' window sums.
        self.score_lists[row] = state.needs_scores
        evicts = state.config.name != "full"
        self.evictable[row] = evicts
        state.evict_lists = (self.cache.list_ids(torch.tensor([row], device=self.cache.device)) if evicts
                             else torch.empty(0, dtype=torch.int64, device=self.cache.device))
        return row

    def release(self, req_ids) -> None:
        """Return every page of these requests (unknown ids are ignored)."""
        rows = [self.rows.pop(r) for r in req_ids if r in self.rows]
        if not rows:
            return
        self.cache.release(torch.tensor(rows, dtype=torch.int64, device=self.cache.device))
        # A row's reported pages are what it held (its lists have not moved since);
        # a row planned but never reported holds more than it says: count none.
        self._free_floor += sum(self.state[row].pages_held for row in rows if self.state[row].reported)
        for row in rows:
            del self.state[row]
            self._free_rows.append(row)

    # --- one step ---------------------------------------------------------------

    def plan_step(self, req_ids: list[str], num_tokens: list[int], positions: torch.Tensor,
                  token_ids: torch.Tensor) -> StepMetadata:
        """Allocate slots for ``num_tokens[i]`` new tokens of each (live) request.

        positions / token_ids: [>= T] for the step's tokens, requests in ``req_ids`` order.
        Raises PagePoolShortError (nothing allocated) if the pool cannot serve the step.
        """
        device = self.cache.device
        rows = [self.rows[r] for r in req_ids]
        states = [self.state[r] for r in rows]
        total = int(sum(num_tokens))
        rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        counts = torch.tensor(num_tokens, dtype=torch.int64, device=device)
        self._free_floor = self.check_plan(req_ids, states, num_tokens, rows_t, counts)
        slot_mapping = self.cache.allocate(rows_t, counts, total, max(num_tokens, default=0))
        starts = [0]
        for n in num_tokens[:-1]:
            starts.append(starts[-1] + n)
        requests = StepRequests(list(req_ids), rows, rows_t, list(num_tokens), starts[:len(rows)], 0)
        tokens = StepTokens(
            token_row=torch.repeat_interleave(rows_t, counts, output_size=total).to(torch.int32),
            positions=positions[:total].to(torch.int32),
            flags=self.token_flags[token_ids[:total].long().clamp(0, self.token_flags.numel() - 1)],
            slot_mapping=slot_mapping)
        meta = StepMetadata(requests, tokens, self._plan_scoring(states, requests, tokens))
        for st, n in zip(states, num_tokens):
            st.chunk_end = st.ends_chunk(n)
            st.tokens += n
            st.longest += n
            st.longest_evictable += n
            st.reported = False
            if st.profiled:
                st.since_evict += n
        requests.width = min(self.cache.width, -(-max((s.longest for s in states), default=0) // self.block_size))
        meta.path = self.attention.plan(meta)
        return meta

    def check_plan(self, req_ids: list[str], states: list[RowState], num_tokens: list[int],
                   rows_t: torch.Tensor, counts: torch.Tensor) -> int:
        """Check before act: raise unless the free stack can serve the step; nothing moves.

        rows_t / counts: [R] int64 on the pool's device, the step's rows and new tokens.
        Returns a lower bound of the pages free once the step is allocated (exact when
        read from the device).

        Where the free count lives decides the cost: ``cache.num_free`` is a device
        tensor (on CUDA, reading it syncs with the GPU), so the check first works on
        host integers only. Each request's counters from its last report bound the
        pages the step can pop (``_pages_bound``, the same rule the scheduler reserves
        by), and ``_free_floor`` bounds the free stack from below. If the bound fits
        the floor, no value is read from the device: this is every step whose
        reservation was right. Otherwise (a short reservation, or counters made stale
        by a step that never reported) ``cache.check_allocate`` reads the exact counts:
        one host read, then ``PagePoolShortError`` naming the request, the pages it asks
        for and the pages free if they do not fit. On CPU both halves are free: the
        "device" tensors are host memory.
        """
        bound = self._pages_bound(states, num_tokens)
        if bound is not None and bound <= self._free_floor:
            return self._free_floor - bound
        return self.cache.check_allocate(rows_t, counts, [repr(r) for r in req_ids])  # raises if short

    def _pages_bound(self, states: list[RowState], num_tokens: list[int]) -> int | None:
        """Host bound on the pages the step pops; None if a request's counters are stale.

        Per request of ``lists = L x H`` lists, ``n`` new tokens: a list whose last
        page is full (or empty) opens ``ceil(n / bs)`` pages, any other list
        ``ceil((n - 1) / bs)``; and no list grows past ``ceil((tokens + n) / bs)`` pages,
        so the request pops at most ``lists x that - pages_held``. None also when a
        list could outgrow the page table, which only the exact check reports.
        """
        bs, lists = self.block_size, self.num_layers * self.num_kv_heads
        total = 0
        for st, n in zip(states, num_tokens):
            if not st.reported or -(-(st.longest + n) // bs) > self.cache.width:
                return None
            opening = st.full_lists * -(-n // bs) + (lists - st.full_lists) * -(-max(n - 1, 0) // bs)
            total += min(opening, lists * -(-(st.tokens + n) // bs) - st.pages_held)
        return total

    def _plan_scoring(self, states: list[RowState], requests: StepRequests,
                      tokens: StepTokens) -> StepScoring | None:
        """Observation rows of scoring requests (see StepScoring); None if nobody scores.

        Runs before the states count this step's tokens: ``st.tokens`` is still the
        position of the request's first token of the step.
        """
        if not any(s.needs_scores for s in states):
            return None
        device = self.cache.device
        window = torch.tensor([s.observation_start(n) if s.needs_scores else 1 << 30
                               for s, n in zip(states, requests.num_tokens)], dtype=torch.int32, device=device)
        per_token = torch.repeat_interleave(window, torch.tensor(requests.num_tokens, device=device),
                                            output_size=tokens.positions.numel())
        scoring = StepScoring(weight=(tokens.positions >= per_token).to(torch.float32), lists=self.score_lists)
        if self.attention.scores_by_list:
            decode, decode_heads = [], []
            for row, start, n, st in zip(requests.rows, requests.starts, requests.num_tokens, states):
                first = start + max(0, st.observation_start(n) - st.tokens)
                if not st.needs_scores or first >= start + n:
                    continue
                if n == 1:
                    decode.append((start, row))
                    decode_heads.append(st.score_heads)
                else:
                    scoring.spans.append((row, first, start + n))
            scoring.decode_lists = self._decode_score_lists(decode, decode_heads, device)
        return scoring

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
        self.attention.write_kv(layer, k, v, meta)
        self.attention.attend(layer, q, out, meta, scale)
        return out

    # --- after the forward pass -----------------------------------------------------

    def finish_step(self, meta: StepMetadata) -> StepReport:
        """Evict where due, then report what every request of the step holds."""
        rows = meta.requests.rows
        due_prompt = [r for r in rows if not self.state[r].profiled
                      and self.state[r].tokens >= self.state[r].prompt_len]
        due_decode = [r for r in rows if self.state[r].profiled
                      and self.state[r].since_evict >= self.block_size]
        due_chunk = [r for r in rows if self.state[r].chunk_end]
        if due_chunk:
            self._evict(due_chunk, at_prompt_end=True, final=False)
            self._restart_scores(due_chunk)
            self.chunk_evictions += len(due_chunk)
        if due_prompt:
            self._evict(due_prompt, at_prompt_end=True)
        if due_decode:
            self._evict(due_decode, at_prompt_end=False)
        for r in due_prompt:
            self.state[r].profiled = True
        for r in due_prompt + due_decode:
            self.state[r].since_evict = 0
        return self._report(meta.requests)

    def _report(self, requests: StepRequests) -> StepReport:
        lens = self.cache.lens[requests.rows_t].to(torch.int64)  # [R, L, H]
        bs = self.block_size
        held = ((lens + bs - 1) // bs).sum(dim=(1, 2))
        full_last = (lens % bs == 0).sum(dim=(1, 2))
        slots = lens.sum(dim=(1, 2))
        longest = lens.amax(dim=(1, 2))
        longest_evictable = (lens * self.evictable[requests.rows_t]).amax(dim=(1, 2))
        per_req = torch.stack([held, full_last, slots, longest, longest_evictable]).T.tolist()  # one host read
        extra = torch.stack([self._evicted, self.cache.num_free.reshape(())]).tolist()
        self._evicted.zero_()
        self._free_floor = int(extra[1])  # exact: the next check_plan starts from it
        report = StepReport(evicted_tokens=int(extra[0]), pages_free=int(extra[1]),
                            head_policy_counts=dict(self._decisions))
        self._decisions.clear()
        for req_id, row, (held, full_last, slots, longest, longest_ev) in zip(requests.req_ids, requests.rows,
                                                                               per_req):
            state = self.state[row]
            state.longest, state.pages_held, state.full_lists, state.reported = longest, held, full_last, True
            state.longest_evictable = longest_ev
            report.requests[req_id] = RequestReport(held, full_last, slots, self.state[row].tokens)
        return report

    def _evict(self, rows: list[int], at_prompt_end: bool, final: bool = True) -> None:
        """Apply each request's policy to its lists and compact them (batched per policy).

        ``final`` False: a prompt chunk's end (``compress_by_chunk``), evicted like the
        prompt's end but choosing no rung and counting no decision.
        """
        groups: dict[KVPolicyConfig, list[int]] = {}
        for r in rows:
            groups.setdefault(self.state[r].config, []).append(r)
        for config, group_rows in groups.items():
            if config.name == "full":  # keeps everything: nothing to compute or move
                if at_prompt_end and final:
                    self._decisions["full"] += len(group_rows) * self.num_layers * self.num_kv_heads
                continue
            self._evict_group(config, group_rows, at_prompt_end, final)

    def _restart_scores(self, rows: list[int]) -> None:
        """Zero the slot scores of every page of ``rows``: the next chunk's observation
        rows are all that its profile (or the prompt end's) may sum."""
        rows = [r for r in rows if self.state[r].needs_scores]
        if not rows:
            return
        pages = self.cache.table[torch.tensor(rows, dtype=torch.int64, device=self.cache.device)].reshape(-1)
        self.pool.slot_score.index_fill_(0, pages[pages >= 0].to(torch.int64), 0.0)

    def _evict_group(self, config: KVPolicyConfig, rows: list[int], at_prompt_end: bool, final: bool = True) -> None:
        """Keep masks, then compaction, of the group's lists: every list at the prompt's end;
        afterwards only ``evict_lists``, over the slots of the longest of them."""
        states = [self.state[r] for r in rows]
        rows_t = torch.tensor(rows, dtype=torch.int64, device=self.cache.device)
        if at_prompt_end:
            lists = self.cache.list_ids(rows_t)
            counts = [self.num_layers * self.num_kv_heads] * len(rows)
            num_slots = max(st.tokens for st in states)
        else:
            counts = [st.evict_lists.numel() for st in states]  # numel: host metadata, no sync
            if not sum(counts):
                return
            lists = torch.cat([st.evict_lists for st in states])
            num_slots = max(st.longest_evictable for st in states)
        view = self._slot_view(lists, counts, states, num_slots)
        keep = self._keep_mask(config, rows, rows_t, lists, view, at_prompt_end, final)
        before = self.cache.lens.view(-1)[lists].to(torch.int64).sum()
        plan = self.cache.plan_list_compaction(lists, keep)
        self.attention.compact(plan)
        self.cache.commit_compaction(plan)
        self._evicted += before - plan.new_lens.to(torch.int64).sum()

    def _keep_mask(self, config, rows, rows_t, lists, view: SlotView, at_prompt_end: bool,
                   final: bool = True) -> torch.Tensor:
        policy = config.policy
        if not getattr(policy, "chooses_per_head", False):
            if at_prompt_end and final:
                self._decisions[config.name] += view.lengths.numel()
            return policy.keep_mask(view)
        if not at_prompt_end:
            return policy.keep_mask(view, self.choice.view(-1)[lists])
        shape = (len(rows), self.num_layers, self.num_kv_heads)
        window_tokens = torch.tensor([self.state[r].profile_rows() for r in rows],
                                     dtype=torch.int64, device=rows_t.device)
        window_rows = (window_tokens * self.query_group)[:, None].expand(shape[0], shape[1] * shape[2])
        profile = FastGenProfiler(policy).profile_window(view, view.scores, window_rows.reshape(-1))
        choice, keep = profile.choice.view(shape), profile.keep
        if final:  # a chunk's profile only evicts; the prompt's end settles each list's rung
            self.apply_choice(rows, choice)
            self._record_choices(policy, rows, choice)
        return keep

    def apply_choice(self, rows: list[int], choice: torch.Tensor) -> None:
        """Give the lists of ``rows`` (requests of a per-head policy) their rungs, ``choice``
        [R, L, H]: what they score while decoding, and which lists re-evictions visit."""
        policy = self.state[rows[0]].config.policy
        rows_t = torch.tensor(rows, dtype=torch.int64, device=self.cache.device)
        choice = choice.to(self.choice.device)
        self.choice[rows_t] = choice
        needed = policy.scores_needed(choice)  # [R, L, H]
        self.score_lists[rows_t] = needed  # the dense paths' mask, on the device
        evicts = policy.rung_evicts(choice)
        self.evictable[rows_t] = evicts
        for row, heads, row_evicts in zip(rows, needed.cpu(), evicts.cpu()):  # host copies
            self.state[row].score_heads = heads  # for the list-by-list path
            local = row_evicts.reshape(-1).nonzero()[:, 0].to(rows_t.device)
            self.state[row].evict_lists = row * row_evicts.numel() + local

    def _record_choices(self, policy, rows: list[int], choice: torch.Tensor) -> None:
        """Count decisions per rung and keep the per-head policy map of each request."""
        counts = torch.bincount(choice.reshape(-1), minlength=len(policy.ladder)).tolist()
        for name, count in zip(policy.ladder, counts):
            if count:
                self._decisions[name] += count
        for row, per_layer in zip(rows, choice.tolist()):
            self.head_policies[self.state[row].req_id] = [[policy.ladder[c] for c in heads] for heads in per_layer]
        while len(self.head_policies) > PROFILE_HISTORY:
            self.head_policies.popitem(last=False)

    def _slot_view(self, lists: torch.Tensor, counts: list[int], states: list[RowState],
                   num_slots: int) -> SlotView:
        """SlotView of ``lists`` (flat list ids; ``counts[i]`` of them belong to ``states[i]``,
        in that order), N = num_slots."""
        bs, pool, device = self.block_size, self.pool, lists.device
        logical = torch.arange(num_slots, device=device)
        table = self.cache.table.view(-1, self.cache.width)[lists]  # [M, W]
        page = table[:, logical // bs].long().clamp_min(0)  # [M, N]
        slot = (page * bs + logical % bs).reshape(-1)  # flat slot ids: 1-D gathers, cheaper than 2-D indexing
        lists_per_request = torch.tensor(counts, dtype=torch.int64, device=device)

        def per_request(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device).repeat_interleave(
                lists_per_request, output_size=lists.numel())

        def gather(field: torch.Tensor) -> torch.Tensor:
            return field.reshape(-1).index_select(0, slot).view(-1, num_slots)

        return SlotView(
            flags=gather(pool.slot_flags),
            positions=gather(pool.slot_pos).to(torch.int64),
            scores=gather(pool.slot_score),
            lengths=self.cache.lens.view(-1)[lists].to(torch.int64),
            seq_len=per_request([st.tokens for st in states]),
            prompt_len=per_request([st.prompt_len for st in states]),
        )

    # --- checks -------------------------------------------------------------------------

    def pages_in_use(self) -> int:
        return self.cache.num_pages - int(self.cache.num_free)
