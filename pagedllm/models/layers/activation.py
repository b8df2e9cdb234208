"""Gated activations used by the MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.cpu_kernels import ops as cpu_ops
from pagedllm.models.layers import fused_ops


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for a fused gate/up projection."""

    gated_name = "silu"  # what a packed weight's fused gated GEMV must compute

    def __init__(self) -> None:
        super().__init__()
        self.use_fused = fused_ops.enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused and fused_ops.usable(x):
            return fused_ops.silu_and_mul(x)
        if x.dim() == 2 and cpu_ops.usable(x):
            kernels = cpu_ops.get()
            if kernels is not None:  # bf16 on the CPU: one C call, same rounding
                return kernels.silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The torch reference of forward()."""
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    """gelu(x[..., :d]) * x[..., d:] (Gemma's GeGLU; approximate="tanh" for
    gelu_pytorch_tanh)."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]
