"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.cpu_kernels import ops as cpu_ops
from pagedllm.models.layers import fused_ops


class RMSNorm(nn.Module):
    """RMSNorm; `fp8_output_for` (set at load when an FP8 linear with dynamic activation
    scales reads this norm's output): given the row count, whether the fused CUDA kernel
    hands that linear its rows already quantized (`quantization.fp8.Fp8Activation`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.use_fused = fused_ops.enabled()
        self.fp8_output_for: Callable[[int], bool] | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """Normalize x; with a residual, add it first and return (normed, new residual)."""
        if self.use_fused and fused_ops.usable(x):
            fp8 = self.fp8_output_for is not None and self.fp8_output_for(
                x.numel() // x.shape[-1])
            return fused_ops.rms_norm(x, self.weight, self.eps, residual, fp8)
        if x.dtype == self.weight.dtype and not x.is_cuda:
            if (x.dim() == 2 and cpu_ops.usable(x)
                    and (residual is None or (residual.shape == x.shape
                                              and cpu_ops.usable(residual)))):
                kernels = cpu_ops.get()
                if kernels is not None and kernels.norm_exact(x.shape[1]):
                    # one C call, bit for bit the torch ops below
                    return kernels.add_rms_norm(x, self.weight, self.eps, residual)
            # torch's fused CPU kernel: one op instead of eight (equal to forward_native's
            # result in float32; in bf16 the weight product is rounded once, not twice)
            if residual is not None:
                x = x + residual
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.forward_native(x, residual)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The torch reference of forward()."""
        if residual is not None:
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(orig_dtype)
        return out if residual is None else (out, residual)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the checkpoint stores w - 1 (scale by 1 + w), all in float32, with an
    optional residual add first (then it returns (normed, new residual))."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (xf * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)
