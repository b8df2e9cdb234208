"""The fused CUDA kernels of a decoder layer's small element-wise steps, as the layer
modules reach them: residual add + RMSNorm, SiLU-and-mul, rotary embedding of q and k,
and per-head q / k RMSNorm with the rotary after it.

The Triton kernels themselves live in `fused_kernels`, imported on first use, so that a
CPU engine never imports triton (about 0.2 s of start-up). The layer modules call these
only for CUDA tensors (`usable`); on CPU, and where triton is missing, the torch code runs.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from typing import Any

import torch


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def enabled() -> bool:
    """Fused kernels are on unless PAGEDLLM_FUSED_OPS=0 (read when a layer is built)."""
    return _triton_installed() and os.environ.get("PAGEDLLM_FUSED_OPS", "1") != "0"


def usable(x: torch.Tensor) -> bool:
    """True when the fused kernels can run on x (a CUDA tensor, triton importable)."""
    return x.is_cuda and _triton_installed()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, fp8_output: bool = False) -> Any:
    """RMSNorm over the last dim; with a residual, (norm(x + residual), x + residual).
    fp8_output: the normed rows as a `quantization.fp8.Fp8Activation`."""
    from pagedllm.models.layers import fused_kernels

    return fused_kernels.rms_norm(x, weight, eps, residual, fp8_output)


def silu_and_mul(x: torch.Tensor, fp8_output: bool = False) -> Any:
    """silu(x[..., :d]) * x[..., d:] for a 2-D x of shape [tokens, 2 * d]; fp8_output: as
    a `quantization.fp8.Fp8Activation`."""
    from pagedllm.models.layers import fused_kernels

    return fused_kernels.silu_and_mul(x, fp8_output)


def rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   cos_cache: torch.Tensor, sin_cache: torch.Tensor, head_dim: int,
                   rotary_dim: int) -> None:
    """Rotate-half rotary embedding of flat q [T, Hq * D] and k [T, Hk * D], in place
    (rows may be strided views, e.g. slices of a fused qkv output)."""
    from pagedllm.models.layers import fused_kernels

    fused_kernels.rotary_inplace(positions, q, k, cos_cache, sin_cache, head_dim, rotary_dim)


def qk_norm_rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                           cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                           head_dim: int) -> None:
    """Per-head RMSNorm of flat q and k, then rotate-half rotary over whole heads, in place
    and in one launch (the q_norm / k_norm / rotary of Qwen3-style attention)."""
    from pagedllm.models.layers import fused_kernels

    fused_kernels.qk_norm_rotary_inplace(positions, q, k, q_weight, k_weight, eps, cos_cache,
                                         sin_cache, head_dim)
