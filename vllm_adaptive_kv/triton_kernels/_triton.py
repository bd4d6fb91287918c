"""Optional Triton import and the helpers every kernel wrapper shares.

The package must import without Triton (CPU-only installs); then ``HAS_TRITON`` is
False, ``triton.jit`` is a no-op decorator so the kernel modules still define their
functions, and only the torch references run.

Interpreter mode: Triton decides at *decoration* time (module import) whether a
``@triton.jit`` function is compiled or interpreted, from ``TRITON_INTERPRET``. A
kernel imported without it cannot run on CPU tensors later, so the wrappers ask
the kernel object itself (:func:`is_interpreted`), not the environment at call time.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch references still work
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for ``triton`` so that ``@triton.jit`` bodies are just defined."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = None

IMPLS = ("auto", "triton", "torch")

__all__ = [
    "HAS_TRITON",
    "IMPLS",
    "triton",
    "tl",
    "is_interpreted",
    "use_triton",
    "check_tensor",
    "check_last_dim_contiguous",
    "check_shape",
    "check_power_of_two",
    "check_pool",
    "POOL_DTYPES",
]


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def use_triton(impl: str, kernel, device: torch.device) -> bool:
    """Resolve ``impl`` ("auto" | "triton" | "torch") for tensors on ``device``.

    "auto" picks Triton when it can actually run: CUDA tensors, or a kernel that was
    imported in interpreter mode (``TRITON_INTERPRET=1``); otherwise torch.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; allowed: {IMPLS}")
    if impl == "torch":
        return False
    runnable = HAS_TRITON and (device.type == "cuda" or is_interpreted(kernel))
    if impl == "triton" and not runnable:
        raise ValueError(
            f"impl='triton' cannot run on device={device}: "
            + (
                "triton is not importable"
                if not HAS_TRITON
                else "needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "vllm_adaptive_kv.triton_kernels is imported"
            )
        )
    return runnable


def check_tensor(name: str, t, dtypes=None, dim: int | None = None, device=None) -> None:
    """Raise ValueError naming ``name`` unless ``t`` is a tensor of the allowed kind."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        allowed = dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)
        if t.dtype not in allowed:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: {list(allowed)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}; must be on {device} like the pool")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """Raise ValueError unless ``t.shape == expected`` (``None`` entries match anything)."""
    got = tuple(t.shape)
    ok = len(got) == len(expected) and all(e is None or g == e for g, e in zip(got, expected))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} has shape {got}; expected {shown}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """Kernels vectorize over the last dim, so it must have stride 1."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} has last-dim stride {t.stride(-1)} (strides {t.stride()}); "
            "allowed: 1 (last dim contiguous)"
        )


def check_power_of_two(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name}={value} is not supported; allowed: a power of two >= {minimum}")


POOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_pool(kv_pages, slot_pos=None, slot_flags=None, slot_score=None) -> tuple[int, int, int]:
    """Validate the pool tensors (layout in ``core/layout.py``); return (P, bs, D).

    Metadata tensors may be strided views but must be ``[P, bs]``.
    """
    check_tensor("kv_pages", kv_pages, POOL_DTYPES, dim=4)
    num_pages, two, block_size, head_dim = kv_pages.shape
    if two != 2:
        raise ValueError(f"kv_pages has shape {tuple(kv_pages.shape)}; expected [P, 2, bs, D]")
    check_last_dim_contiguous("kv_pages", kv_pages)
    meta = (("slot_pos", slot_pos, torch.int32), ("slot_flags", slot_flags, torch.uint8),
            ("slot_score", slot_score, torch.float32))
    for name, t, dtype in meta:
        if t is not None:
            check_tensor(name, t, dtype, dim=2, device=kv_pages.device)
            check_shape(name, t, (num_pages, block_size))
    return num_pages, block_size, head_dim


def page_views(kv_pages: torch.Tensor, k_transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(k_pages, v_pages)``, each ``[P, bs, D]``, over ``kv_pages [P, 2, bs, D]``.

    With ``k_transposed`` the K block of each page is stored ``[D, bs]``; the view
    then has strides ``(page stride, 1, bs)``, so ``k_pages[p, t]`` is still slot t.
    """
    num_pages, _, block_size, head_dim = kv_pages.shape
    if kv_pages.stride(3) != 1 or kv_pages.stride(2) != head_dim or kv_pages.stride(1) != block_size * head_dim:
        raise ValueError(f"kv_pages must be contiguous within each page, got strides {kv_pages.stride()}")
    values = kv_pages[:, 1]
    if not k_transposed:
        return kv_pages[:, 0], values
    keys = kv_pages.as_strided((num_pages, block_size, head_dim), (kv_pages.stride(0), 1, block_size),
                               kv_pages.storage_offset())
    return keys, values
