"""Gated activations used by the MLPs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.cpu_kernels import ops as cpu_ops
from pagedllm.models.layers import fused_ops


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for a fused gate/up projection. `fp8_output_for`: as
    `RMSNorm`'s (the down projection an FP8 linear)."""

    gated_name = "silu"  # what a packed weight's fused gated GEMV must compute

    def __init__(self) -> None:
        super().__init__()
        self.use_fused = fused_ops.enabled()
        self.fp8_output_for: Callable[[int], bool] | None = None

    def forward(self, x: torch.Tensor) -> Any:
        if self.use_fused and fused_ops.usable(x):
            fp8 = self.fp8_output_for is not None and self.fp8_output_for(
                x.numel() // x.shape[-1])
            return fused_ops.silu_and_mul(x, fp8)
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
