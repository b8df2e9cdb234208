"""Top-k routing over the router's logits."""

from __future__ import annotations

import torch

from pagedllm.models.layers.fused_moe.experts import triton_usable


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, the top_k of them, optionally renormalized to sum to one
    (`norm_topk_prob`; Mixtral always). Returns (weights float32 [T, k], ids int64 [T, k]).
    One Triton kernel on CUDA (`triton_routing`), torch ops elsewhere."""
    if triton_usable(router_logits):
        from pagedllm.models.layers.fused_moe.triton_routing import triton_select_experts

        return triton_select_experts(router_logits, top_k, renormalize)
    return torch_select_experts(router_logits, top_k, renormalize)


def torch_select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of select_experts."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
