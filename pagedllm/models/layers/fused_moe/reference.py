"""The torch references of the experts' computation (what runs on the CPU) and of the
Triton path's alignment."""

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


def torch_align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The reference of triton_moe.align_tokens, in torch ops: the pairs sorted by expert
    (stably), each expert's run padded to block_m with the value num_pairs."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    max_padded = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_in_sorted = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - first_in_sorted[sorted_experts]
    dest = padded_start[sorted_experts] + rank
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    blocks = torch.arange(max_padded // block_m, device=device)
    block_expert = torch.searchsorted(padded_end // block_m, blocks, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert, padded_end[-1:].to(torch.int32), max_padded
