"""Mixture-of-experts feed-forward: top-k routing, the experts' stacked weights, a torch
reference path (CPU) and a fused Triton kernel (CUDA)."""

from pagedllm.models.layers.fused_moe.experts import fused_experts
from pagedllm.models.layers.fused_moe.layer import FusedMoE, expert_checkpoint_name
from pagedllm.models.layers.fused_moe.reference import torch_experts
from pagedllm.models.layers.fused_moe.routing import select_experts

__all__ = ["FusedMoE", "expert_checkpoint_name", "fused_experts", "select_experts",
           "torch_experts"]
