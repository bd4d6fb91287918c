"""Scheduler-side accounting: a KV-cache spec type and its block manager.

vLLM's ``BlockPool`` keeps counting its own blocks; one block stands for
``L x H`` head pages (``block_size`` tokens of every layer and KV head of this
rank), which is exactly what a vanilla block holds. The worker owns which head
page holds what (``HeadCacheRuntime``); the scheduler only has to reserve
enough blocks that the worker can never run out:

    reserved_blocks(req) >= ceil(pages the worker may hold after the step / (L x H))

Before a request's first report (prefill), that is the vanilla count
``ceil(tokens / bs)``. After each step the worker reports, per request, the pages
it holds and how many of its lists have a full last page; the next
``k`` tokens can then need at most::

    held + due x ceil(k / bs) + (lists - due) x ceil((k - 1) / bs)   pages

A request's block list keeps vanilla's *positional* length ``ceil(tokens / bs)``
(so vLLM's worker-side block table never outgrows its width), but only the
reserved number of entries are real blocks; the others are vLLM's null block::

    tokens = 70, bs = 16 -> 5 positions;  reserved = 3
    req_to_blocks = [b12, b40, b7, null, null]

Surplus real blocks go back to the ``BlockPool`` as soon as a report shows the
worker freed pages, so admission, preemption and ``vllm:kv_cache_usage_perc``
all follow the pages actually held.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..core.step import RequestReport


@dataclass(frozen=True, kw_only=True)
class AdaptiveKVSpec(FullAttentionSpec):
    """Same page bytes as full attention; selects ``AdaptiveKVManager``."""


class AdaptiveKVManager(FullAttentionManager):
    """Reserves blocks by head pages actually held (see the module docstring)."""

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.lists_per_block = 0  # L x H of this rank; set by the connector (configure)
        self.held: dict[str, RequestReport] = {}  # the worker's last report (fullest rank)

    def configure(self, lists_per_block: int) -> None:
        if lists_per_block <= 0:
            raise ValueError(f"lists_per_block={lists_per_block} must be positive")
        self.lists_per_block = lists_per_block

    # --- the reservation rule ---------------------------------------------------

    def reserved_blocks(self, request_id: str, num_tokens: int) -> int:
        """Real blocks needed so that ``num_tokens`` tokens fit (never above vanilla)."""
        positions = cdiv(num_tokens, self.block_size)
        report = self.held.get(request_id)
        if report is None or not self.lists_per_block:
            return positions
        k = max(0, num_tokens - report.tokens)
        others = self.lists_per_block - report.full_lists
        growth = report.full_lists * cdiv(k, self.block_size) + others * cdiv(max(k - 1, 0), self.block_size)
        return min(positions, cdiv(report.pages_held + growth, self.lists_per_block))

    def _real_blocks(self, request_id: str) -> int:
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))

    # --- SingleTypeKVCacheManager overrides ---------------------------------------

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, *args, **kwargs) -> int:
        if request_id not in self.held:
            return super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks, *args, **kwargs)
        return max(self.reserved_blocks(request_id, num_tokens) - self._real_blocks(request_id), 0)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        if request_id not in self.held:
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        blocks = self.req_to_blocks[request_id]
        missing = self.reserved_blocks(request_id, num_tokens) - self._real_blocks(request_id)
        fresh = self.block_pool.get_new_blocks(missing) if missing > 0 else []
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in fresh)
        # Real blocks first fill null positions, then extend; the list only grows
        # to the positional length, and only the appended entries are "new".
        for i, block in enumerate(blocks):
            if fresh and block.is_null:
                blocks[i] = fresh.pop()
        appended = cdiv(num_tokens, self.block_size) - len(blocks)
        new_entries = [fresh.pop() if fresh else self._null_block for _ in range(max(appended, 0))]
        blocks.extend(new_entries)
        assert not fresh, "reserved more real blocks than block positions"
        return new_entries

    def free(self, request_id: str) -> None:
        self.held.pop(request_id, None)
        super().free(request_id)

    def pop_blocks_for_free(self, request_id: str):
        self.held.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    # --- worker feedback ---------------------------------------------------------------

    def apply_report(self, request_id: str, report: RequestReport) -> int:
        """Record what the worker holds; return surplus real blocks to the pool.

        Returns the number of blocks freed. Unknown (already freed) requests are ignored.
        """
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            return 0
        self.held[request_id] = report
        surplus = self._real_blocks(request_id) - cdiv(report.pages_held, self.lists_per_block)
        freed = []
        for i in range(len(blocks) - 1, -1, -1):
            if len(freed) >= surplus:
                break
            if not blocks[i].is_null:
                freed.append(blocks[i])
                blocks[i] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)
        return len(freed)


_SPEC_REGISTERED = False


def register_spec() -> None:
    """Register the spec type after vLLM's built-ins (an empty registry would skip them)."""
    global _SPEC_REGISTERED
    if _SPEC_REGISTERED:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(AdaptiveKVSpec, AdaptiveKVManager, uniform_type_base_spec=AdaptiveKVSpec)
    _SPEC_REGISTERED = True


# The engine core imports this module when it unpickles a worker's spec, before
# it groups the specs: registering at import covers every process.
register_spec()
