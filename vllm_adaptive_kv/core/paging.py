"""Per-(layer, kv_head) paging: a device-side free stack and per-request page tables.

Every operation here is vectorized over all head lists of all requests it
touches and never synchronizes with the host (no ``.item()``, no ``nonzero``):
writes that only some lists need are redirected to a *trash* element at the end
of the flat storage instead of being filtered.

Free stack (``P`` pages)::

    free_stack  [ p7 p3 p9 p0 ... | trash ]
                  ^ bottom     ^ num_free-1 = top; pops take from the top

Page tables (``max_reqs`` rows, ``L`` layers, ``H`` kv heads, ``W`` pages per list)::

    table [max_reqs, L, H, W] int32, -1 = no page
    lens  [max_reqs, L, H]    int32

Allocation for ``n`` new tokens of a list holding ``len`` slots needs
``ceil((len+n)/bs) - ceil(len/bs)`` pages; they are popped in list order::

    need   = [1, 0, 2, 1]          (per list)
    offset = [0, 1, 1, 3]          (exclusive cumsum)
    list 2 takes free_stack[top-1], free_stack[top-2]

Check before act: ``check_allocate`` compares what a step asks for with the
free stack and raises ``PagePoolShortError`` before any page moves; ``allocate``
itself does not check (it runs on the device without reading anything back). A
step that skipped the check and asked for more than is free would give one
page to several lists.

Compaction of a list keeps the slots of a keep mask, in order, at the front::

    logical   0  1  2  3  4  5  6
    keep      1  0  1  1  0  0  1       new_len = 4
    moves            2->1 3->2    6->3  (slot 0 stays; ascending order)
    pages     [a  b] [c  d] [e  f] [g .]  bs=2 -> keep ceil(4/2)=2 pages, free e-f, g-.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import NO_PAGE


def _with_trash(numel: int, fill: int, device) -> torch.Tensor:
    """A flat int32 buffer of ``numel`` entries plus one trash entry at the end."""
    return torch.full((numel + 1,), fill, dtype=torch.int32, device=device)


def _masked_index(index: torch.Tensor, mask: torch.Tensor, trash: int) -> torch.Tensor:
    """``index`` where ``mask`` else the trash position; for sync-free masked writes."""
    return torch.where(mask, index, torch.full_like(index, trash))


class PagePoolShortError(RuntimeError):
    """A step asks for more head pages than the free stack holds; nothing was allocated.

    Raised by ``PagedHeadCache.check_allocate`` before any page moves, so the pool
    is left as it was. Requests take pages in step order; ``request`` is the first
    one that does not fit, ``asked`` its pages and ``free`` what the step's earlier
    requests left; ``step_asked`` / ``step_free`` are the whole step's.
    """

    def __init__(self, request: str, asked: int, free: int, step_asked: int, step_free: int) -> None:
        self.request, self.asked, self.free = request, asked, free
        self.step_asked, self.step_free = step_asked, step_free
        earlier = "" if free == step_free else (
            f" (the step's earlier requests take {step_free - free}; the step asks for {step_asked} "
            f"pages, {step_free} free)")
        super().__init__(
            f"head page pool short: request {request} asks for {asked} pages, {free} free{earlier}; "
            "no page was moved. The step was scheduled with fewer pages reserved than it needs "
            "(inside vLLM: the block reservation of vllm_adaptive_kv/plugin/spec.py)")


@dataclass
class CompactionPlan:
    """Moves that compact some head lists, and the resulting lengths.

    M head lists, named by flat list id ``(row * L + layer) * H + head``; a whole
    request row's lists come in (layer, head) order.

    lists     [M]    int64  the lists compacted
    src_slot  [M, K] int64  physical slot ids to read, ascending logical order
    dst_slot  [M, K] int64  physical slot ids to write
    num_moves [M]    int32  valid moves per list (entries beyond are ignored)
    new_lens  [M]    int32

    K is N on a device; on the CPU it is cut to the largest num_moves.
    """

    lists: torch.Tensor
    src_slot: torch.Tensor
    dst_slot: torch.Tensor
    num_moves: torch.Tensor
    new_lens: torch.Tensor


class PagedHeadCache:
    """Free stack plus page tables for ``max_reqs`` request rows; allocated once."""

    def __init__(
        self,
        num_pages: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        max_pages_per_list: int,
        max_reqs: int,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("num_pages", num_pages),
            ("block_size", block_size),
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("max_pages_per_list", max_pages_per_list),
            ("max_reqs", max_reqs),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: allowed values are positive integers")
        self.num_pages = num_pages
        self.block_size = block_size
        self.shape = (max_reqs, num_layers, num_kv_heads)
        self.width = max_pages_per_list
        self.device = torch.device(device)
        self._stack = _with_trash(num_pages, NO_PAGE, device)
        self._stack[:num_pages] = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=device)
        self.num_free = torch.full((1,), num_pages, dtype=torch.int64, device=device)
        self._table = _with_trash(max_reqs * num_layers * num_kv_heads * max_pages_per_list, NO_PAGE, device)
        self.table = self._table[:-1].view(*self.shape, max_pages_per_list)
        self.lens = torch.zeros(self.shape, dtype=torch.int32, device=device)

    # --- views -------------------------------------------------------------

    @property
    def free_stack(self) -> torch.Tensor:
        return self._stack[:-1]

    def pages_needed(self, lens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        """Pages each list needs to grow by ``new_tokens``: lens [..], new_tokens broadcastable."""
        bs = self.block_size
        return (lens + new_tokens + bs - 1) // bs - (lens + bs - 1) // bs

    def pages_held(self, rows: torch.Tensor) -> torch.Tensor:
        """Pages held per request row: [R] int64."""
        return ((self.lens[rows].to(torch.int64) + self.block_size - 1) // self.block_size).sum(dim=(1, 2))

    # --- allocate ----------------------------------------------------------

    def check_allocate(self, rows: torch.Tensor, num_tokens: torch.Tensor,
                       names: list[str] | None = None) -> int:
        """Check before ``allocate``: raise unless every list of ``rows`` can take its tokens.

        rows [R] int64, num_tokens [R] (device); names: how the errors call each row
        (default ``row N``). One host read (on CUDA a sync): pages asked per row, the
        widest list per row after growth and ``num_free``. Raises ``PagePoolShortError``
        naming the first row, in allocation order, that the free stack cannot serve;
        RuntimeError if a list would outgrow its page-table width. Nothing moves either
        way. Returns the pages that stay free after the allocation.
        """
        bs = self.block_size
        lens = self.lens[rows].to(torch.int64)
        grow = num_tokens.to(torch.int64)[:, None, None]
        asked = self.pages_needed(lens, grow).sum(dim=(1, 2))
        widest = ((lens + grow + bs - 1) // bs).amax(dim=(1, 2))
        values = torch.cat([asked, widest, self.num_free]).tolist()  # the one host read
        count = rows.numel()
        asked_per_row, widest_per_row, free = values[:count], values[count:2 * count], values[-1]
        names = names if names is not None else [f"row {r}" for r in rows.tolist()]
        taken = 0
        for name, pages in zip(names, asked_per_row):
            if taken + pages > free:
                raise PagePoolShortError(name, pages, free - taken, sum(asked_per_row), free)
            taken += pages
        for name, pages in zip(names, widest_per_row):
            if pages > self.width:
                raise RuntimeError(f"request {name} would need {pages} pages in one head list, more than "
                                   f"max_pages_per_list={self.width}; nothing was allocated")
        return free - taken

    def allocate(
        self,
        rows: torch.Tensor,
        num_tokens: torch.Tensor,
        total_tokens: int,
        max_tokens_per_request: int | None = None,
    ) -> torch.Tensor:
        """Grow every list of ``rows`` by ``num_tokens[r]`` slots; return their slot ids.

        Act half of ``check_allocate``: it does not check that the free stack holds
        the pages (that would read the device), so the caller must know it does.

        rows [R] int64, num_tokens [R] int64 (device). ``total_tokens`` (the sum) and
        ``max_tokens_per_request`` (an upper bound, default ``total_tokens``) are
        host-known from the scheduler, so no value is read back from the device.
        Returns slot_mapping [L, T, H] int64: token t of the batch (requests in
        ``rows`` order) goes to physical slot ``slot_mapping[l, t, h]`` of list (row, l, h).
        """
        num_tokens = num_tokens.to(torch.int64)
        bound = total_tokens if max_tokens_per_request is None else max_tokens_per_request
        max_new_pages = min(self.width, -(-bound // self.block_size) + 1)
        lens = self.lens[rows].to(torch.int64)  # [R, L, H]
        need = self.pages_needed(lens, num_tokens[:, None, None]).reshape(-1)  # [M]
        self._pop_pages(rows, lens, need, max_new_pages)
        slots = self._slot_ids_for_new_tokens(rows, lens, num_tokens, total_tokens)
        self.lens[rows] = (lens + num_tokens[:, None, None]).to(torch.int32)
        return slots

    def _pop_pages(self, rows: torch.Tensor, lens: torch.Tensor, need: torch.Tensor, max_new: int) -> None:
        """Pop ``need[m]`` (<= max_new) pages per list from the stack top into the tables."""
        j = torch.arange(max_new, device=self.device)
        offset = torch.cumsum(need, 0) - need  # exclusive
        wanted = j[None, :] < need[:, None]  # [M, J]
        # The clamp only keeps the gather in bounds; a checked step never reaches it.
        stack_pos = (self.num_free - 1 - (offset[:, None] + j[None, :])).clamp_min(0)
        pages = self._stack[stack_pos]
        first_new = (lens.reshape(-1) + self.block_size - 1) // self.block_size  # [M]
        col = (first_new[:, None] + j[None, :]).clamp_max(self.width - 1)
        flat = self.list_ids(rows)[:, None] * self.width + col
        self._table.index_put_((_masked_index(flat, wanted, self._table.numel() - 1),), pages)
        self.num_free -= need.sum()

    def _slot_ids_for_new_tokens(
        self, rows: torch.Tensor, lens: torch.Tensor, num_tokens: torch.Tensor, total_tokens: int
    ) -> torch.Tensor:
        bs = self.block_size
        token_row = torch.repeat_interleave(
            torch.arange(rows.numel(), device=self.device), num_tokens, output_size=total_tokens
        )  # [T] index into rows
        starts = torch.cumsum(num_tokens, 0) - num_tokens
        k = torch.arange(total_tokens, device=self.device) - starts[token_row]  # offset within request
        logical = lens[token_row] + k[:, None, None]  # [T, L, H]
        per_row = self.shape[1] * self.shape[2]
        list_id = rows[token_row][:, None] * per_row + torch.arange(per_row, device=self.device)
        flat = list_id.view_as(logical) * self.width + logical // bs
        page = self._table[flat].to(torch.int64)
        return (page * bs + logical % bs).permute(1, 0, 2).contiguous()

    def list_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Flat list ids (row, layer, head) of ``rows`` in that order: [R * L * H]."""
        per_row = self.shape[1] * self.shape[2]
        return (rows[:, None] * per_row + torch.arange(per_row, device=self.device)[None, :]).reshape(-1)

    # --- release -------------------------------------------------------------

    def release(self, rows: torch.Tensor) -> None:
        """Return every page of ``rows`` to the pool and empty their lists."""
        pages = self.table[rows].reshape(-1)
        self._push_pages(pages, pages != NO_PAGE)
        self.table[rows] = NO_PAGE
        self.lens[rows] = 0

    def _push_pages(self, pages: torch.Tensor, mask: torch.Tensor) -> None:
        rank = torch.cumsum(mask.to(torch.int64), 0) - 1
        pos = _masked_index(self.num_free + rank, mask, self._stack.numel() - 1)
        self._stack.index_put_((pos,), pages.to(torch.int32))
        self.num_free += mask.sum()

    # --- compaction ------------------------------------------------------------

    def plan_compaction(self, rows: torch.Tensor, keep: torch.Tensor) -> CompactionPlan:
        """Turn keep masks of whole request rows into in-place moves (see ``plan_list_compaction``).

        keep [R, L, H, N] bool (N >= the longest list; slots past a list's length
        are ignored).
        """
        return self.plan_list_compaction(self.list_ids(rows), keep.reshape(-1, keep.shape[-1]))

    def plan_list_compaction(self, lists: torch.Tensor, keep: torch.Tensor) -> CompactionPlan:
        """Turn keep masks of some head lists into in-place moves; the tables are not changed yet.

        lists [M] int64 flat list ids (distinct), keep [M, N] bool (N >= the longest of
        these lists; slots past a list's length are ignored). Apply the moves with the
        compaction kernel, then ``commit_compaction``. Survivors keep their order::

            keep     1 0 0 1 1 0 1      new_index = cumsum(keep) - 1
            moves    3->1, 4->2, 6->3   (slot 0 stays; K = 3 columns)
        """
        lens = self.lens.view(-1)[lists].to(torch.int64)
        n = keep.shape[-1]
        idx = torch.arange(n, device=self.device)
        keep = keep & (idx < lens[:, None])
        new_index = torch.cumsum(keep.to(torch.int64), -1) - 1
        moved = keep & (new_index != idx)  # [M, N]
        num_moves = moved.sum(-1)
        # The kernels read only each row's first num_moves entries. On the CPU the widest
        # row costs nothing to read, and cutting the plan to it skips most of the slot
        # arithmetic at decode re-evictions (a few moves per list of ~1k slots); on a
        # device reading it would be a sync, so the plan keeps all N columns there.
        width = int(num_moves.max()) if self.device.type == "cpu" and num_moves.numel() else n
        # moved slots first, ascending: each one's rank among the moved is its column
        # (a scatter, not a sort; unmoved slots all go to a spare column, dropped)
        rank = torch.where(moved, torch.cumsum(moved, -1) - 1, width)
        order = torch.zeros(moved.shape[0], width + 1, dtype=torch.int64, device=self.device)
        order = order.scatter_(1, rank, idx.expand_as(rank))[:, :width]
        src_logical = order
        dst_logical = new_index.gather(1, order).clamp_min(0)
        tables = self._table[:-1].view(-1, self.width)[lists].to(torch.int64)  # [M, W]
        return CompactionPlan(
            lists=lists,
            src_slot=self._physical(tables, src_logical),
            dst_slot=self._physical(tables, dst_logical),
            num_moves=num_moves.to(torch.int32),
            new_lens=keep.sum(-1).to(torch.int32),
        )

    def _physical(self, tables: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        if bs & (bs - 1) == 0:  # a power of two: shifts, not int64 divisions (slow on the CPU)
            shift = bs.bit_length() - 1
            page = tables.gather(1, (logical >> shift).clamp_max(self.width - 1))
            return (page << shift) | (logical & (bs - 1))
        page = tables.gather(1, (logical // bs).clamp_max(self.width - 1))
        return page * bs + logical % bs

    def commit_compaction(self, plan: CompactionPlan) -> None:
        """After the moves ran: free each list's tail pages and set the new lengths."""
        bs = self.block_size
        table = self._table[:-1].view(-1, self.width)
        tables = table[plan.lists]  # [M, W]
        keep_pages = (plan.new_lens.to(torch.int64) + bs - 1) // bs
        col = torch.arange(self.width, device=self.device)
        tail = (col >= keep_pages[:, None]) & (tables != NO_PAGE)
        self._push_pages(tables.reshape(-1), tail.reshape(-1))
        table[plan.lists] = torch.where(tail, torch.full_like(tables, NO_PAGE), tables)
        self.lens.view(-1)[plan.lists] = plan.new_lens

    # --- checks (sync; tests and debug) ----------------------------------------

    def audit(self) -> dict:
        """Verify the ownership invariant; raise AssertionError naming what broke.

        Every page is either on the free stack or in exactly one table entry, a
        list holds exactly ceil(len / bs) pages in its leading columns.
        """
        num_free = int(self.num_free)
        assert 0 <= num_free <= self.num_pages, f"num_free={num_free} outside [0, {self.num_pages}]"
        free = self.free_stack[:num_free].to(torch.int64)
        owned = self.table[self.table != NO_PAGE].to(torch.int64)
        counts = torch.bincount(torch.cat([free, owned]), minlength=self.num_pages)
        assert counts.numel() == self.num_pages, "a page id is out of range"
        assert int(counts.max()) <= 1, f"page {int(counts.argmax())} is free or owned more than once"
        assert int(counts.min()) >= 1, f"page {int(counts.argmin())} leaked: neither free nor owned"
        held = (self.table != NO_PAGE).sum(-1)
        expected = (self.lens.to(torch.int64) + self.block_size - 1) // self.block_size
        assert torch.equal(held, expected), "a list's page count does not match its length"
        leading = torch.arange(self.width, device=self.device) < expected[..., None]
        assert torch.equal(self.table != NO_PAGE, leading), "a list has a hole in its page table"
        return {"free": num_free, "owned": int(owned.numel())}
