"""The attention backend interface: metadata for one mixed batch, and the per-layer impl."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Describes one step's flat batch of tokens to every attention layer.

    Requests lie one after another in the flat token dimension. Request i owns query tokens
    ``query_start_loc[i]:query_start_loc[i+1]``; those are the last tokens of its context,
    whose total length (cached prefix + new tokens) is ``seq_lens[i]``. Its KV lives in the
    blocks ``block_table[i, :ceil(seq_lens[i] / block_size)]``; token t of the flat batch is
    written to slot ``slot_mapping[t]`` (= block_id * block_size + offset; -1 = padding, skip).
    Prefill chunks (query length > 1, with or without a cached prefix) and decodes (query
    length 1) share one batch and one backend call.
    """

    num_actual_tokens: int  # real tokens; tensors may be padded past this (CUDA graphs)
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], on the model's device
    seq_lens: torch.Tensor  # int32 [num_reqs], on the model's device
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks_per_req], on the model's device
    slot_mapping: torch.Tensor  # int64 [num_tokens], on the model's device
    query_start_loc_cpu: torch.Tensor  # int32 [num_reqs + 1] on the CPU
    seq_lens_cpu: torch.Tensor  # int32 [num_reqs] on the CPU
    is_decode_only: bool = False  # every request has query length 1
    # Values a backend derives from this metadata once per step and reuses in every layer.
    backend_cache: dict[Any, Any] = field(default_factory=dict, repr=False)


class AttentionImpl(ABC):
    """One attention layer's computation over a paged KV cache."""

    name = "attention backend"  # for messages
    supports_logits_soft_cap = False
    # Per-tensor scales of an FP8 KV cache (float32 [1] on the device; set by the layer).
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        """`sliding_window`: each query attends to itself and the window - 1 keys before it
        (None: the whole context). `logits_soft_cap`: scores become cap * tanh(s / cap);
        a backend without it refuses such a model rather than ignore the cap."""
        if logits_soft_cap is not None and not self.supports_logits_soft_cap:
            raise ValueError(
                f"{self.name} does not implement attention logit softcapping (the model sets "
                f"attn_logit_softcapping={logits_soft_cap}); use attention_backend='TORCH_SDPA'.")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        """Write key/value into kv_cache at metadata.slot_mapping, then attend causally."""


class AttentionBackend(ABC):
    """A named family of attention implementations (e.g. TORCH_SDPA, TRITON_ATTN)."""

    name: str = ""

    @staticmethod
    @abstractmethod
    def is_available(device: str) -> bool:
        """True when this backend can run on the device (packages importable, hardware)."""

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]: ...

    @staticmethod
    def supports_cuda_graphs() -> bool:
        return False

    @staticmethod
    def supports_mixed_cuda_graphs() -> bool:
        """Whether steps with query lengths > 1 (mixed prefill + decode steps, speculation's
        verify steps) replay from CUDA graphs: the mixed-batch path reads every per-request
        length from device tensors, its launch depends on the token and request counts."""
        return False

    @staticmethod
    def implementation() -> str:
        """The kernels this backend runs, as the start-up log names them."""
        return "our kernels"

    @staticmethod
    def scratch_layers() -> int:
        """Layers' worth of KV memory the backend needs besides the cache while it runs."""
        return 0

    @staticmethod
    def unavailable_reason(device: str) -> str:
        """Why is_available(device) is False, and what to use instead."""
        return ""

    @classmethod
    def resolve_block_size(cls, block_size: int | None) -> int:
        """The KV block size to use: the user's (checked) or this backend's default."""
        if block_size is None:
            return 16
        if block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size={block_size} is not supported by {cls.name}; use 8, "
                             "16, 32, 64 or 128.")
        return block_size

    @classmethod
    def check_model(cls, dtype: torch.dtype, head_size: int) -> None:
        """Raise ValueError (naming the setting to change) when the backend cannot run a
        model of this dtype and head size (the default backends run any)."""
        del dtype, head_size

    @classmethod
    def check_kv_cache_dtype(cls, kv_cache_dtype: str) -> None:
        """Raise ValueError when the backend cannot run a KV cache of this kind ('auto' is the
        model dtype; 'fp8' is e4m3 with per-tensor scales)."""
        if kv_cache_dtype != "auto":
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported by the "
                             f"{cls.name} attention backend; use attention_backend="
                             "'TRITON_ATTN' on a GPU with compute capability >= 8.9, or "
                             "kv_cache_dtype='auto'.")

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor,
                    dst: torch.Tensor) -> None:
        """Copy whole KV blocks src[i] -> dst[i] in every layer (copy-on-write of forks)."""
        for cache in kv_caches:
            if cache.element_size() == 1:  # fp8: copied as bytes
                cache = cache.view(torch.uint8)
            cache.index_copy_(1, dst, cache.index_select(1, src))
