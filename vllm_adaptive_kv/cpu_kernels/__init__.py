"""The C++ CPU kernels (``csrc/cpu/``), each with a thin checked wrapper and its torch reference.

``vllm_adaptive_kv._C`` is built by the package's install step (``setup.py``; ``make
setup`` installs with ``--no-build-isolation`` so it compiles against the installed
torch). Importing it registers the ops under ``torch.ops.adaptive_kv``. When it was
not built (no compiler, an isolated build), ``HAS_CPU_KERNELS`` is False and callers
use the torch path; the reference here is also the kernels' test oracle.

    scored_decode_attention   decode attention of scored lists, adding each slot's
                              softmax probability (summed over the query group) to
                              its score, reading K and V once
    score_rows                the scores of prefill observation rows (the prompt's last
                              window), list by list, without the attention output
    write_kv                  a layer's new K/V rows and slot metadata into their slots
                              (reference: ``triton_kernels.write_kv.write_kv_reference``)
    compact_slots             a compaction plan's slot moves
                              (reference: ``triton_kernels.compaction.compact_slots_reference``)

The list kernels (``scored_decode_attention``, ``score_rows``) are built once per ISA
(AVX-512, AVX2 with FMA, the baseline) and the best one the CPU runs is used;
``VLLM_ADAPTIVE_KV_CPU_ISA`` (checked at import) or ``cpu_isa(name)`` picks another
(``cpu_isas()`` lists those this CPU and build can run).
"""

from __future__ import annotations

import os

import torch

from ..triton_kernels.paged_attention import add_slot_scores, list_attention, list_probs

try:
    from .. import _C  # noqa: F401  (registers torch.ops.adaptive_kv)

    HAS_CPU_KERNELS = True
except ImportError:  # not built: the torch paths run instead
    HAS_CPU_KERNELS = False

__all__ = ["HAS_CPU_KERNELS", "compact_slots", "cpu_isa", "cpu_isas", "score_rows", "score_rows_reference",
           "scored_decode_attention", "scored_decode_attention_reference", "write_kv"]

NOT_BUILT = ("vllm_adaptive_kv._C is not built (make setup builds it, or pip install --no-build-isolation -e .); "
             "use the torch reference")
ISA_ENV = "VLLM_ADAPTIVE_KV_CPU_ISA"


def cpu_isas() -> list[str]:
    """The ISAs whose list kernels this CPU and build can run, best first ("avx512", "avx2", "generic")."""
    if not HAS_CPU_KERNELS:
        raise RuntimeError(NOT_BUILT)
    return torch.ops.adaptive_kv.cpu_isas().split(", ")


def cpu_isa(name: str | None = None) -> str:
    """The ISA whose list kernels run; with ``name``, switch to it first (one of ``cpu_isas()``,
    else ValueError naming it and those allowed)."""
    if not HAS_CPU_KERNELS:
        raise RuntimeError(NOT_BUILT)
    if name is not None and name not in cpu_isas():
        raise ValueError(f"cpu_isa: {name!r} is not an ISA this CPU and build can run; allowed: {cpu_isas()}")
    return torch.ops.adaptive_kv.cpu_isa(name or "")


def _check_isa_env() -> None:
    """Fail at start-up, not at the first decode step, on a bad VLLM_ADAPTIVE_KV_CPU_ISA."""
    name = os.environ.get(ISA_ENV)
    if HAS_CPU_KERNELS and name and name not in cpu_isas():
        raise ValueError(f"{ISA_ENV}={name!r} is not an ISA this CPU and build can run; allowed: {cpu_isas()} "
                         f"(unset it to use the best)")


_check_isa_env()


def write_kv(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
             flags: torch.Tensor, kv_pages: torch.Tensor, slot_pos: torch.Tensor, slot_flags: torch.Tensor,
             slot_score: torch.Tensor, k_transposed: bool = False) -> None:
    """``triton_kernels.write_kv.write_kv`` on the CPU in one C++ loop (same arguments, minus ``impl``).

    key / value [T, H, D], slot_mapping [T, H] int64 (-1 = skip), positions [T] int32,
    flags [T] uint8; every written slot's score is reset to 0. Reference:
    ``write_kv_reference``. The kernel checks shapes, dtypes, devices and slot bounds
    and raises naming the argument (checks in Python would cost more than the write).
    """
    if not HAS_CPU_KERNELS:
        raise RuntimeError(NOT_BUILT)
    torch.ops.adaptive_kv.write_kv(key, value, slot_mapping, positions, flags, kv_pages, slot_pos, slot_flags,
                                   slot_score, k_transposed)


def compact_slots(kv_pages: torch.Tensor, slot_pos: torch.Tensor, slot_flags: torch.Tensor, slot_score: torch.Tensor,
                  src_slot: torch.Tensor, dst_slot: torch.Tensor, num_moves: torch.Tensor,
                  k_transposed: bool = False) -> None:
    """``triton_kernels.compaction.compact_slots`` on the CPU (same arguments, minus ``impl``).

    src_slot / dst_slot [M, N] int64, num_moves [M] int32 under the planner's contract
    (``compaction.py``); rows (head lists) run in parallel. Reference:
    ``compact_slots_reference``. The kernel checks shapes, dtypes and slot bounds.
    """
    if not HAS_CPU_KERNELS:
        raise RuntimeError(NOT_BUILT)
    torch.ops.adaptive_kv.compact_slots(kv_pages, slot_pos, slot_flags, slot_score, src_slot, dst_slot, num_moves,
                                        k_transposed)


def scored_decode_attention(q: torch.Tensor, token: torch.Tensor, row: torch.Tensor, head: torch.Tensor,
                            table: torch.Tensor, lens: torch.Tensor, q_pos: torch.Tensor,
                            kv_pages: torch.Tensor, slot_pos: torch.Tensor, out: torch.Tensor,
                            slot_score: torch.Tensor, scale: float) -> None:
    """Attention and scores of N decode lists, one query token each, in place.

    q [T, Hq, D] (pool dtype, last dim contiguous); list n is (token[n], row[n],
    head[n]) int64 [N]: its G = Hq / H query heads ``head * G ..`` of token ``token``
    attend list (row, head) of the layer views ``table [R, H, W]`` / ``lens [R, H]``
    int32; key slot s is visible iff ``s < lens`` and ``slot_pos <= q_pos[token]``
    (q_pos [T] int32). kv_pages [P, 2, bs, D] with K blocks stored [D, bs]
    (``k_transposed``). Writes out [T, Hq, D] for those rows and adds each visible
    slot's probability, summed over the G heads, to slot_score [P, bs] fp32. Each list
    must appear once (no two lists share a slot). The kernel checks shapes, dtypes and
    index bounds and raises naming the argument; it reads no other tensor.
    """
    if not HAS_CPU_KERNELS:
        raise RuntimeError(NOT_BUILT)
    torch.ops.adaptive_kv.scored_decode_attention(q, token, row, head, table, lens, q_pos, kv_pages, slot_pos,
                                                  out, slot_score, float(scale))


def scored_decode_attention_reference(q, token, row, head, table, lens, q_pos, kv_pages, slot_pos, out,
                                      slot_score, scale) -> None:
    """Torch version of :func:`scored_decode_attention` (same arguments): the score rule of
    ``list_probs`` / ``add_slot_scores`` with decode logits in the pool's dtype."""
    if token.numel() == 0:
        return
    num_heads = table.shape[1]
    group = q.shape[1] // num_heads
    head_dim = q.shape[2]
    list_lens = lens[row, head]
    width = max(1, -(-int(list_lens.max()) // kv_pages.shape[2]))
    page = table[row, head, :width]
    ql = q.view(q.shape[0], num_heads, group, head_dim)[token, head][:, None]  # [N, 1, G, D]
    attn, probs, page = list_attention(ql, page, list_lens, q_pos[token].long()[:, None], kv_pages, slot_pos,
                                       scale, k_transposed=True, decode_logits_in_pool_dtype=True)
    out.view(q.shape[0], num_heads, group, head_dim)[token, head] = attn[:, 0].to(out.dtype)
    add_slot_scores(slot_score, probs, page)


def score_rows(q: torch.Tensor, first: torch.Tensor, count: torch.Tensor, row: torch.Tensor, head: torch.Tensor,
               table: torch.Tensor, lens: torch.Tensor, q_pos: torch.Tensor, kv_pages: torch.Tensor,
               slot_pos: torch.Tensor, slot_score: torch.Tensor, scale: float) -> None:
    """Add the softmax probabilities of N lists' query rows to their slots' scores.

    List n is (row[n], head[n]) of the layer views ``table [R, H, W]`` / ``lens [R, H]``;
    its rows are tokens ``first[n] .. first[n] + count[n] - 1`` of q [T, Hq, D], each with
    the G query heads of kv head ``head``. Logits in float32 (the reference's rule for
    multi-token rows), key slot s visible iff ``s < lens`` and ``slot_pos <= q_pos[token]``;
    each slot gains its probability summed over the rows and their G heads. first /
    count / row / head int64 [N]; two lists must not share a slot. K blocks stored
    [D, bs] (``k_transposed``). Reference: ``score_rows_reference``.
    """
    if not HAS_CPU_KERNELS:
        raise RuntimeError(NOT_BUILT)
    torch.ops.adaptive_kv.score_rows(q, first, count, row, head, table, lens, q_pos, kv_pages, slot_pos, slot_score,
                                     float(scale))


def score_rows_reference(q, first, count, row, head, table, lens, q_pos, kv_pages, slot_pos, slot_score,
                         scale) -> None:
    """Torch version of :func:`score_rows` (same arguments): ``list_probs`` / ``add_slot_scores``, list by list."""
    num_heads = table.shape[1]
    group = q.shape[1] // num_heads
    by_head = q.view(q.shape[0], num_heads, group, q.shape[2])
    block_size = kv_pages.shape[2]
    for t0, n, r, h in zip(first.tolist(), count.tolist(), row.tolist(), head.tolist()):
        if n == 0:
            continue
        list_len = lens[r, h].reshape(1)
        width = max(1, -(-int(list_len) // block_size))
        page = table[r, h, :width].reshape(1, width)
        rows = by_head[t0:t0 + n, h][None]  # [1, n, G, D]
        probs, page = list_probs(rows, page, list_len, q_pos[t0:t0 + n].long()[None], kv_pages, slot_pos, scale,
                                 k_transposed=True)
        add_slot_scores(slot_score, probs, page)
