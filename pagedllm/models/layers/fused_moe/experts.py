"""Dispatch of the experts' computation: the Triton kernel on CUDA, else the torch path."""

from __future__ import annotations

import os

import torch

from pagedllm.models.layers.fused_moe.reference import torch_experts


def triton_usable(x: torch.Tensor) -> bool:
    """CUDA tensor, triton importable and PAGEDLLM_FUSED_MOE not 0."""
    if not x.is_cuda or os.environ.get("PAGEDLLM_FUSED_MOE", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The routed experts' output [T, H] (this rank's partial sum under tensor parallelism)."""
    if triton_usable(x):
        from pagedllm.models.layers.fused_moe.triton_moe import triton_experts

        return triton_experts(x, w13, w2, topk_weights, topk_ids)
    return torch_experts(x, w13, w2, topk_weights, topk_ids)
