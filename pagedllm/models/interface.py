"""The model protocol: what the runner and the KV cache need to know about a model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from pagedllm.attention.backends.abstract import AttentionMetadata


@dataclass(frozen=True)
class KVCacheSpec:
    """One attention layer's KV cache on this rank."""

    num_kv_heads: int  # per tensor-parallel rank
    head_dim: int
    sliding_window: int | None = None  # None: the layer attends to the whole context

    def bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V one token takes in this layer."""
        return 2 * self.num_kv_heads * self.head_dim * element_size


@runtime_checkable
class DecoderModel(Protocol):
    """A decoder over the paged KV cache (every generating model; also decoders that pool)."""

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """One spec per layer, in layer order (the runner allocates one cache per entry)."""
        ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        """Final hidden states of every token of the flat batch."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the selected hidden states."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Fill the parameters from HF-named checkpoint tensors; ValueError names what is
        missing or mismatched."""
        ...
