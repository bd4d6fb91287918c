"""Device bytes the runtime keeps beside vLLM's KV buffer, and the KV budget that leaves room for them.

vLLM sizes its one KV buffer from the bytes a worker reports
(``determine_available_memory``): ``num_blocks = budget // block_bytes``, one block
being ``L * H`` of our head pages. The runtime then allocates, on the same device and
outside that budget (``HeadCacheRuntime``, ``PagedHeadCache``, ``KVPool``)::

    per page    slot_pos int32, slot_flags uint8, slot_score fp32   9 B per slot (KVPool)
                one free-stack entry                                int32
    per list    page table [R, L, H, W] int32 (+1 trash entry)      W = ceil(max_model_len / bs) + 1
                lens int32, choice int64, score_lists bool,         [R, L, H] each
                evictable bool
    fixed       free-stack trash entry int32, num_free int64, evicted int64, token flags [vocab] uint8
    slack       ALLOCATOR_ROUNDING per tensor (the CUDA caching allocator rounds sizes up)

(R = max_num_seqs, L layers, H kv heads of this rank.) ``kv_budget`` gives the largest
whole number of vLLM blocks whose buffer plus all of the above fits in the available
bytes, so ``gpu_memory_utilization`` still holds. It also keeps room for the largest
per-step temporary, the split-K workspace of ``paged_attention`` (capped at
``SPLIT_WORKSPACE_BYTES``): vLLM's memory profile cannot see it, because attention
does nothing in the profiling run. Smaller temporaries (step plans, compaction
moves) come and go like activations and are not counted; so do the live requests'
``RowState.evict_lists`` (at most ``R * L * H`` int64 in all, like ``choice``).
"""

from __future__ import annotations

from ..triton_kernels.paged_attention import SPLIT_WORKSPACE_BYTES
from .layout import KVPool

INT32, INT64, UINT8, BOOL = 4, 8, 1, 1
ALLOCATOR_ROUNDING = 2 << 20  # bytes; the caching allocator's large-block granularity


class KVBudgetError(ValueError):
    """The available bytes cannot hold the runtime's tables plus one KV block."""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid: allowed values are positive integers")


def runtime_tensor_bytes(num_pages: int, block_size: int, num_layers: int, num_kv_heads: int,
                         max_num_seqs: int, max_model_len: int, vocab_size: int = 0) -> dict[str, int]:
    """Bytes of each device tensor the runtime allocates beside a pool of ``num_pages`` pages."""
    slots = num_pages * block_size
    lists = max_num_seqs * num_layers * num_kv_heads
    width = -(-max_model_len // block_size) + 1  # HeadCacheRuntime's pages per list
    return {
        "slot_pos": slots * INT32, "slot_flags": slots * UINT8, "slot_score": slots * 4,  # KVPool
        "free_stack": (num_pages + 1) * INT32, "num_free": INT64,  # PagedHeadCache
        "table": (lists * width + 1) * INT32, "lens": lists * INT32,
        "choice": lists * INT64, "score_lists": lists * BOOL, "evictable": lists * BOOL,  # HeadCacheRuntime
        "evicted": INT64,
        "token_flags": vocab_size * UINT8,
    }


RUNTIME_TENSORS = len(runtime_tensor_bytes(1, 1, 1, 1, 1, 1))


def metadata_bytes_per_page(block_size: int) -> int:
    """Runtime bytes per head page: the pool's slot metadata plus one free-stack entry."""
    return block_size * KVPool.metadata_bytes_per_slot() + INT32


def runtime_bytes(num_pages: int, block_size: int, num_layers: int, num_kv_heads: int, max_num_seqs: int,
                  max_model_len: int, vocab_size: int = 0) -> int:
    """Device bytes the runtime allocates beside a pool of ``num_pages`` head pages, slack included."""
    tensors = runtime_tensor_bytes(num_pages, block_size, num_layers, num_kv_heads, max_num_seqs, max_model_len,
                                   vocab_size)
    return sum(tensors.values()) + len(tensors) * ALLOCATOR_ROUNDING


def kv_budget(available: int, kv_bytes_per_slot: int, block_size: int, num_layers: int, num_kv_heads: int,
              max_num_seqs: int, max_model_len: int, vocab_size: int = 0,
              step_workspace: int = SPLIT_WORKSPACE_BYTES) -> int:
    """The KV bytes to report to vLLM so that its buffer plus the runtime fit in ``available``.

    ``kv_bytes_per_slot``: K+V bytes of one token in one (layer, head) page
    (``2 * head_dim * dtype size``). The result is a whole number of vLLM blocks
    (``L * H * block_size * kv_bytes_per_slot`` bytes each), the most that fit.
    ``step_workspace``: room kept for the largest per-step temporary (default: the
    split-K workspace cap).
    """
    _check_positive(kv_bytes_per_slot=kv_bytes_per_slot, block_size=block_size, num_layers=num_layers,
                    num_kv_heads=num_kv_heads, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    if not isinstance(vocab_size, int) or vocab_size < 0:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid: allowed values are integers >= 0")
    pages_per_block = num_layers * num_kv_heads
    block_kv = pages_per_block * block_size * kv_bytes_per_slot
    block_total = block_kv + pages_per_block * metadata_bytes_per_page(block_size)
    if not isinstance(step_workspace, int) or step_workspace < 0:
        raise ValueError(f"step_workspace={step_workspace!r} is invalid: allowed values are integers >= 0")
    fixed = (runtime_bytes(0, block_size, num_layers, num_kv_heads, max_num_seqs, max_model_len, vocab_size)
             + step_workspace)
    num_blocks = max(available - fixed, 0) // block_total
    if num_blocks < 1:
        raise KVBudgetError(
            f"vllm-adaptive-kv: {available} bytes available for the KV cache cannot hold the runtime's tables "
            f"and step workspace ({fixed} bytes for max_num_seqs={max_num_seqs}, max_model_len={max_model_len}) plus one KV block "
            f"({block_total} bytes with its slot metadata): allowed is more memory (raise "
            f"gpu_memory_utilization) or smaller tables (lower max_num_seqs or max_model_len)")
    return num_blocks * block_kv
