"""The torch reference of the experts' computation (what runs on the CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k weight_k * down_e(silu(gate_e(x)) * up_e(x)) over each token's experts e.

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_* [T, k].
    Tokens are grouped by expert (one stable sort) and each expert with tokens runs two
    matmuls; contributions are added in expert order."""
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    out = torch.zeros_like(x)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        idx = tokens[start:start + count]
        h = F.linear(x[idx], w13[expert])
        d = h.shape[-1] // 2
        h = F.linear(F.silu(h[:, :d]) * h[:, d:], w2[expert])
        out.index_add_(0, idx, (h * weights[start:start + count, None]).to(out.dtype))
        start += count
    return out
