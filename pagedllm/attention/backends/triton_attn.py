"""TRITON_ATTN: paged attention through our own Triton kernels (CUDA, graph capturable decode)."""

from __future__ import annotations

import torch

from pagedllm.attention.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
)


class TritonAttentionImpl(AttentionImpl):
    """Writes K/V into the paged cache, then runs the decode or the unified prefill kernel."""

    name = "TRITON_ATTN"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Attend causally over the paged cache; returns ``[T, Hq, D]`` in query dtype.

        Rows past ``metadata.num_actual_tokens`` are left unwritten (they may hold anything).
        """
        from pagedllm.attention.ops.triton_decode_attention import decode_attention
        from pagedllm.attention.ops.triton_prefill_attention import prefill_attention
        from pagedllm.attention.ops.triton_reshape_and_cache import reshape_and_cache

        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_size)
        key = key.view(-1, self.num_kv_heads, self.head_size)
        value = value.view(-1, self.num_kv_heads, self.head_size)
        num_actual = min(metadata.num_actual_tokens, num_tokens)
        out = torch.empty_like(query)
        if num_actual == 0:
            return out
        slots = metadata.slot_mapping[: min(num_actual, metadata.slot_mapping.shape[0])]
        reshape_and_cache(key, value, kv_cache, slots, self.k_scale, self.v_scale)

        if metadata.is_decode_only:
            # One token per request; the grid is sized by the (padded) token count so the
            # launch is graph-capturable. Rows beyond the metadata tensors are not computed.
            batch = min(num_tokens, metadata.seq_lens.shape[0], metadata.block_table.shape[0])
            decode_attention(
                query[:batch],
                kv_cache,
                metadata.block_table,
                metadata.seq_lens,
                self.scale,
                sliding_window=self.sliding_window,
                out=out[:batch],
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
        else:
            prefill_attention(
                query,
                kv_cache,
                metadata.block_table,
                metadata.seq_lens,
                metadata.query_start_loc,
                num_reqs=metadata.num_reqs,
                num_tokens=num_actual,
                scale=self.scale,
                sliding_window=self.sliding_window,
                out=out,
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
        return out


class TritonAttentionBackend(AttentionBackend):
    """Our Triton paged-attention kernels."""

    name = "TRITON_ATTN"

    @staticmethod
    def is_available(device: str) -> bool:
        """True on a CUDA device with triton importable."""
        if not str(device).startswith("cuda"):
            return False
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TritonAttentionImpl

    @staticmethod
    def supports_cuda_graphs() -> bool:
        return True

    @staticmethod
    def supports_mixed_cuda_graphs() -> bool:
        return True

    @staticmethod
    def implementation() -> str:
        return "pagedllm's Triton kernels"

    @classmethod
    def check_kv_cache_dtype(cls, kv_cache_dtype: str) -> None:
        """FP8 (e4m3) caches need Triton's e4m3 conversions: compute capability >= 8.9."""
        if kv_cache_dtype == "auto":
            return
        from pagedllm.quantization.spec import cuda_supports_fp8

        if not cuda_supports_fp8():
            major, minor = torch.cuda.get_device_capability()
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs a GPU with compute "
                             f"capability >= 8.9 (Ada, Hopper); this one is {major}.{minor}. "
                             "Use kv_cache_dtype='auto'.")
