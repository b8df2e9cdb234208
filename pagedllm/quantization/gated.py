"""The gated form of a quantized gate / up weight: silu(x W_gate^T) * (x W_up^T) in the
weight's own one-row GEMV (`fp8_gemv`, `int4_gemv`), so that an MLP at decode batch 1
runs one kernel for its projection and activation. `MergedColumnParallelLinear.
forward_gated` asks a packed weight for it and applies the activation itself where the
answer is None.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedGemvWeight(nn.Module):
    """Base of `Fp8Weight` and `Int4Weight`: `gated` on top of their `path`, `_gemv` and
    `kernel_input` (the activations in the order the kernels expect)."""

    in_features: int
    out_features: int

    def path(self, m: int, is_cuda: bool) -> str:
        raise NotImplementedError

    def _gemv(self, x2: torch.Tensor, gated: bool) -> torch.Tensor:
        raise NotImplementedError

    def kernel_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x [M, K] in the kernels' input order (the identity unless overridden)."""
        return x2

    def gated(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """silu(x W_gate^T) * (x W_up^T) for a fused gate / up weight (gate rows first) in
        one kernel, or None where that kernel does not serve these rows (the caller then
        applies the activation itself). Activations already quantized (`Fp8Activation`)
        go to the GEMM, never here."""
        if not isinstance(x, torch.Tensor):
            return None
        x2 = x.reshape(-1, self.in_features)
        if (activation != "silu" or self.out_features % 2
                or self.path(x2.shape[0], x2.is_cuda) != "gemv"):
            return None
        y = self._gemv(self.kernel_input(x2), gated=True)
        return y.view(*x.shape[:-1], self.out_features // 2)
