"""The attention backend's device-neutral parts: metadata, builder, impl, layout.

The backend owns no state: every step, ``AdaptiveMetadataBuilder.build`` hands
each layer an ``AdaptiveAttentionMetadata`` that points at the worker's
``HeadCacheRuntime`` and the step's ``StepMetadata`` (planned once for all
layers by the model runner). ``AdaptiveAttentionImpl.forward`` hands the layer's
q / k / v to ``HeadCacheRuntime.attend``, which writes K/V into the slots
allocated for the step and runs the attention path chosen at start-up (on CPU,
vLLM's CPU kernel or the torch reference; on CUDA, the Triton kernels).

vLLM's own KV-cache write (``do_kv_cache_update``, by block-table slot mapping)
is switched off with ``forward_includes_kv_cache_update = True``: vLLM's block
ids do not address our pages. ``AdaptiveBackendMixin`` holds the class-level
declarations every device backend shares; ``plugin/cpu/backend.py`` puts it in
front of vLLM's CPU backend, ``plugin/gpu/backend.py`` in front of the bare
``AttentionBackend``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..core.runtime import HeadCacheRuntime, StepMetadata
from .spec import AdaptiveKVSpec

SUPPORTED_BLOCK_SIZES = [16, 32, 64, 128, 256]


@dataclass
class StepSource:
    """Per-worker handle the runner fills each step and the builders read."""

    runtime: HeadCacheRuntime
    layer_index: dict[str, int]  # vLLM layer name -> our layer index
    step: StepMetadata | None = None


@dataclass
class AdaptiveAttentionMetadata:
    num_actual_tokens: int
    source: StepSource | None
    step: StepMetadata | None


class AdaptiveMetadataBuilder(AttentionMetadataBuilder[AdaptiveAttentionMetadata]):
    """Wraps the runner's step plan; vLLM's block table and slot mapping are unused."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.source: StepSource | None = None

    def bind(self, source: StepSource) -> None:
        self.source = source

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        step = self.source.step if self.source is not None else None
        return AdaptiveAttentionMetadata(common_attn_metadata.num_actual_tokens, self.source, step)


class AdaptiveAttentionImpl(AttentionImpl):
    """Decoder self-attention over the runtime's head lists."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap or None, "sinks": sinks,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"vllm-adaptive-kv attention does not support {name}={value!r}")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"vllm-adaptive-kv attention supports decoder self-attention only, "
                                      f"got attn_type={attn_type!r}")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"kv_cache_dtype={kv_cache_dtype!r}: allowed only 'auto'")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported")
        if attn_metadata is None or attn_metadata.step is None:
            return output  # warm-up / profiling runs without a planned step
        step = attn_metadata.step
        source = attn_metadata.source
        n = step.tokens.positions.numel()
        source.runtime.attend(source.layer_index[layer.layer_name], query[:n], key[:n], value[:n],
                              output[:n], step, self.scale)
        return output


def adaptive_spec(spec):
    """Mark a plain full-attention layer spec as ours (same page bytes)."""
    if type(spec) is not FullAttentionSpec:
        raise NotImplementedError(f"vllm-adaptive-kv handles full-attention layers only, got {type(spec).__name__}")
    return AdaptiveKVSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})


class AdaptiveBackendMixin:
    """Class-level declarations shared by every device's adaptive backend."""

    forward_includes_kv_cache_update: bool = True
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return list(SUPPORTED_BLOCK_SIZES)

    @staticmethod
    def get_impl_cls():
        return AdaptiveAttentionImpl

    @staticmethod
    def get_builder_cls():
        return AdaptiveMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def customize_spec(cls, spec):
        return adaptive_spec(spec)


def pool_view(kv_caches: list[torch.Tensor]) -> torch.Tensor:
    """vLLM's single KV buffer as ``[P, 2, bs, D]`` head pages (no copy).

    Every layer's cache is a ``[B, H, bs, 2 * D]`` view of ONE allocation, laid
    out layer-major (LBHNC): page ``(l * B + b) * H + h`` is block b, head h of
    layer l, K rows then V rows. All layers' pages form one pool. Each view is
    checked against that (same buffer, same shape, contiguous, at its layer's
    offset) and the buffer against the page count; a mismatch names what was found.
    """
    first = kv_caches[0]
    if first.dim() != 4:
        raise RuntimeError(f"vLLM's KV cache views are not [blocks, heads, block_size, 2 * head_dim]: layer 0 has "
                           f"shape {tuple(first.shape)}")
    num_blocks, num_heads, block_size, two_d = first.shape
    storage = first.untyped_storage()
    page_bytes = block_size * two_d * first.element_size()
    layer_bytes = num_blocks * num_heads * page_bytes
    for index, cache in enumerate(kv_caches):
        if cache.untyped_storage().data_ptr() != storage.data_ptr():
            raise RuntimeError(f"vLLM's KV buffer is not one allocation: layer {index}'s cache is in another buffer "
                               f"than layer 0's")
        if cache.shape != first.shape or cache.dtype != first.dtype:
            raise RuntimeError(f"vLLM's KV cache views differ: layer {index} is {tuple(cache.shape)} {cache.dtype}, "
                               f"layer 0 is {tuple(first.shape)} {first.dtype}")
        if not cache.is_contiguous():
            raise RuntimeError(f"vLLM's KV cache is not head-major (LBHNC): layer {index}'s view has strides "
                               f"{cache.stride()} for shape {tuple(cache.shape)}, expected contiguous")
        start = cache.storage_offset() * cache.element_size()
        if start != index * layer_bytes:
            raise RuntimeError(f"vLLM's KV buffer is not layer-major: layer {index}'s cache starts at byte {start}, "
                               f"expected {index * layer_bytes} ({index} x {layer_bytes} bytes per layer)")
    num_pages = storage.nbytes() // page_bytes
    expected = num_blocks * num_heads * len(kv_caches)
    if num_pages != expected:
        raise RuntimeError(f"vLLM's KV buffer is not one layer-major allocation: {num_pages} pages in "
                           f"storage, expected {expected} (layers x blocks x heads)")
    pages = torch.empty(0, dtype=first.dtype, device=first.device)
    pages.set_(storage, 0, (num_pages, 2, block_size, two_d // 2))
    return pages
