"""The attention layer: reshapes flat q/k/v and calls the selected backend's impl.

`k_scale` / `v_scale` (float32 [1]) are the per-tensor scales of an FP8 KV cache (the cache
holds k / k_scale); the impl holds the same tensors, filled at load
(`pagedllm.quantization.kv_cache`)."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionImpl, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, impl_cls: type[AttentionImpl], num_heads: int, head_dim: int,
                 scale: float, num_kv_heads: int, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.impl = impl_cls(num_heads, head_dim, scale, num_kv_heads, sliding_window,
                             logits_soft_cap)
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.impl.k_scale = self.k_scale
        self.impl.v_scale = self.v_scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        n = q.shape[0]
        out = self.impl.forward(
            q.view(n, self.num_heads, self.head_dim),
            k.view(n, self.num_kv_heads, self.head_dim),
            v.view(n, self.num_kv_heads, self.head_dim),
            kv_cache,
            metadata,
        )
        return out.reshape(n, self.num_heads * self.head_dim)
