"""Step buffers: tensors a per-step path reuses instead of allocating each step.

A decode step is the same handful of shapes again and again, so the attention
paths take their per-step tensors as views of persistent buffers (one
preallocated cache, nano-vllm style). ``reserve`` sizes a buffer at start-up; a
step that needs more than any before grows it once (by half again), and every
later step of that size or smaller allocates nothing::

    buffers = StepBuffers("cpu")
    buffers.reserve("query", 64 * 3 * 3 * 64, torch.bfloat16)   # at bind time
    query = buffers.take("query", (rows, 3, 64), torch.bfloat16)  # each layer: a view

``allocations`` counts the buffers created so far: tests read it to prove that a
warm decode step allocates none. A view taken from a buffer is valid until the next
``take`` of the same name with a larger size.
"""

from __future__ import annotations

import math

import torch


class StepBuffers:
    """Named grow-only flat buffers on one device."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.allocations = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def reserve(self, name: str, numel: int, dtype: torch.dtype) -> None:
        """Make buffer ``name`` hold at least ``numel`` elements of ``dtype``."""
        current = self._buffers.get(name)
        if current is not None and current.dtype == dtype and current.numel() >= numel:
            return
        grown = numel if current is None or current.dtype != dtype else max(numel, current.numel() * 3 // 2)
        self._buffers[name] = torch.empty(max(1, grown), dtype=dtype, device=self.device)
        self.allocations += 1

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (grown first if it is too small)."""
        numel = math.prod(shape)
        self.reserve(name, numel, dtype)
        return self._buffers[name][:numel].view(shape)
