"""Triton kernel: activations [M, K] -> e4m3 codes and one float32 scale per row (dynamic:
max |x| of the row / 448; static: a given per-tensor scale), in one pass over x."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.quantization.fp8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX


@triton.jit
def quantize_row(out_ptr, scale_ptr, row, y, cols, mask, FP8_MAX: tl.constexpr,
                 MIN_SCALE: tl.constexpr):
    """One row y (float32) held in registers -> its e4m3 codes at out_ptr + cols and its
    dynamic scale max |y| / 448 at scale_ptr + row (also the fused norm / SiLU kernels')."""
    scale = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), 0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    q = tl.clamp(y / scale, -FP8_MAX, FP8_MAX)
    tl.store(out_ptr + cols, q.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x, stride_q,
    FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr, STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """One program per row. ONE_TILE: the row fits one tile (read x once)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_TILE and not STATIC:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        quantize_row(q_row, s_ptr, row, x, offs, offs < K, FP8_MAX_C, MIN_SCALE)
    else:
        if STATIC:
            scale = tl.load(static_ptr)
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.maximum(tl.max(amax, 0) / FP8_MAX_C, MIN_SCALE)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -FP8_MAX_C, FP8_MAX_C)
            tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


def quantize_fp8(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[
        torch.Tensor, torch.Tensor]:
    """x [M, K] (fp16 / bf16 / fp32, unit stride in K) -> (e4m3 [M, K], float32 [M, 1]).

    The dynamic scale is max |x_row| / 448; codes are x / scale rounded to nearest (the
    reference: `fp8.quantize_tokens_reference`)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales
    block = min(triton.next_power_of_2(k), 4096)
    static = static_scale is not None
    _quantize_rows_kernel[(m,)](
        x, q, scales, static_scale if static else scales, k, x.stride(0), q.stride(0),
        FP8_MAX_C=FP8_MAX, MIN_SCALE=_MIN_SCALE, STATIC=static, BLOCK_K=block,
        ONE_TILE=block >= k, num_warps=4 if block <= 2048 else 8,
    )
    return q, scales
