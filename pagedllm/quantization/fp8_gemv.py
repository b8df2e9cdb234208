"""Triton FP8 weight-only skinny GEMM for decode: y [M, N] = x [M, K] @ (codes * scale)^T
for M <= `SMALL_M_MAX`, activations in bf16 / fp16 (no activation quantization).

At decode M is the batch (1 .. 16), so the product is a weight stream: 1 byte per weight
read once, almost no arithmetic. ``_scaled_mm`` is a poor fit there (its M = 1 tiles waste
the tensor cores' rows and the per-token quantization costs one more launch per linear),
so this kernel reads the e4m3 codes [N, K] (K contiguous: 16-byte vector loads along K),
converts them to the activations' dtype in registers and multiplies on the tensor cores
with the operands swapped (acc [BLOCK_N, 16] = W tile @ x tile^T: the weight tile is the
large operand, x the 16-wide one); the per-channel scale is applied once at the end.

Tuning from first principles for H100 / H200 (132 SMs, 4.8 TB/s):
* 4.8 TB/s over 132 SMs at ~1.9 GHz is ~19 bytes per SM per clock; a memory latency of
  ~0.7 us then needs ~25 KB in flight per SM. A [16, 512] e4m3 tile is 8 KB; with 3
  pipeline stages and 2+ programs resident per SM that is 48 KB.
* Programs: N / 16 tiles gives 256 (o_proj, down_proj) to 1792 (gate_up) programs for the
  Llama-3-8B shapes, so no split over K is needed there (a split costs a zeroing and a
  cast: two more graph nodes per linear). K is split only where the N tiles alone cannot
  give every SM a program (small models, tensor-parallel shards); the split then aims at
  four programs per SM and adds float32 partial sums atomically.
* The configuration depends on the shapes only (no autotuning, no host syncs), so every
  launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.quantization.fp8 import GEMV_MAX_M
from pagedllm.quantization.int4_kernels import _num_sms

SMALL_M_MAX = GEMV_MAX_M  # rows served by this kernel (the dispatcher's threshold)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (n tile, k split): acc[n, m] = sum over its K range of W[n, k] x[m, k]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            xt = tl.load(x_rows + k[:, None], mask=m_mask[None, :], other=0.0)
        else:
            k_mask = k < k_hi
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
            xt = tl.load(x_rows + k[:, None], mask=m_mask[None, :] & k_mask[:, None],
                         other=0.0)
        acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=PRECISION)
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * scale[:, None]
    y = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask, sem="relaxed")


def fp8_gemv_config(m: int, n: int, k: int, num_sms: int) -> dict[str, int]:
    """Tiles, K split and launch settings for M <= SMALL_M_MAX rows (shapes only; see the
    module docstring for the reasoning)."""
    if m > SMALL_M_MAX:
        raise ValueError(f"The FP8 skinny GEMM serves at most {SMALL_M_MAX} rows, got {m}.")
    block_n = 16
    block_k = 512 if k >= 512 else max(32, triton.next_power_of_2(k))
    tiles = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split = 1
    if tiles < num_sms:
        split = max(1, min(k_blocks, (4 * num_sms) // tiles))
        if split < 2:
            split = 1
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, split=split, num_warps=4,
                num_stages=3)


def fp8_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
             out_dtype: torch.dtype | None = None,
             config: dict[str, int] | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16 / fp32) @ (codes [N, K] e4m3 * scale [N] float32)^T -> [M, N]
    in `out_dtype` (default x's dtype)."""
    m, k = x.shape
    n = codes.shape[0]
    if codes.shape[1] != k:
        raise ValueError(f"x has {k} features; the FP8 weight {codes.shape[1]}.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out_dtype = out_dtype or x.dtype
    cfg = dict(config or fp8_gemv_config(m, n, k, _num_sms(x.device)))
    split = cfg.pop("split")
    block_k = cfg["BLOCK_K"]
    k_blocks = triton.cdiv(k, block_k)
    per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k, per_split)
    if split == 1:
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        _fp8_gemv_kernel[grid](
            x, codes, scale.reshape(-1), y, m, n, k, per_split,
            x.stride(0), codes.stride(0), y.stride(0),
            SPLIT=split, EVEN_K=k % block_k == 0 and per_split % block_k == 0,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return y if split == 1 else y.to(out_dtype)
