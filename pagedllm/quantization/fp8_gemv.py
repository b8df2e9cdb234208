"""Triton FP8 weight-only GEMV for decode at batch 1: y [1, N] = x [1, K] @ (codes *
scale)^T, activations in bf16 / fp16 / fp32 (no activation quantization).

One row makes the product a weight stream: 1 byte per weight read once and two flops on
it. Tensor cores do not help there (an M = 1 tile wastes 15 of their 16 rows, and feeding
them needs the converted weights moved into their operand layout through shared memory),
and ``_scaled_mm`` adds a per-token quantization launch. So this kernel streams the e4m3
codes [N, K] (K contiguous: 16-byte vector loads), converts them to float32 in registers
and multiply-adds on the CUDA cores:

* each program owns BLOCK_N output channels and a K range; it keeps a [BLOCK_N, BLOCK_K]
  float32 tile of elementwise products and reduces it over K once, at the end (no
  cross-thread reduction in the loop); the per-channel scale is applied once;
* at 4.8 TB/s an H200 SM must take ~19 weights per clock; a weight costs a convert and an
  FMA, ~40 of the SM's 128 lane-operations per clock;
* K is split (float32 partial sums added atomically) only where the N tiles alone leave
  SMs idle; the configuration comes from the shapes only (no autotuning, no host syncs),
  so every launch is CUDA-graph capturable.
More rows are the GEMM's (`Fp8Weight.path`): measured on an H200, a kernel of this kind
with [M, BLOCK_N, BLOCK_K] tiles took 2.2x (M = 4) and 3.9x (M = 8) its one-row time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.quantization.fp8 import GEMV_MAX_M
from pagedllm.quantization.int4_kernels import _num_sms

SMALL_M_MAX = GEMV_MAX_M  # rows served by this kernel: one
_ACC_ELEMENTS = 8192  # float32 accumulator elements per program (64 registers at 4 warps)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, N, K, k_per_split, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Program (n tile, k split): y[n] (+)= scale[n] * sum over its K range of x[k] W[n, k]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptr + k)
        else:
            k_mask = k < k_hi
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
            x = tl.load(x_ptr + k, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    out = tl.sum(acc, axis=1) * scale
    if SPLIT == 1:
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, out, mask=n_mask, sem="relaxed")


def fp8_gemv_config(m: int, n: int, k: int, num_sms: int) -> dict[str, int]:
    """Tile, K split and launch settings for one row (shapes only; see the module
    docstring for the reasoning)."""
    if m > SMALL_M_MAX:
        raise ValueError(f"The FP8 skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    block_n = 8
    block_k = max(32, min(_ACC_ELEMENTS // block_n, triton.next_power_of_2(k)))
    tiles = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split = 1
    if tiles < num_sms:
        split = max(1, min(k_blocks, (4 * num_sms) // tiles))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, split=split, num_warps=4, num_stages=3)


def fp8_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
             out_dtype: torch.dtype | None = None,
             config: dict[str, int] | None = None) -> torch.Tensor:
    """x [1, K] (bf16 / fp16 / fp32) @ (codes [N, K] e4m3 * scale [N] float32)^T -> [1, N]
    in `out_dtype` (default x's dtype)."""
    m, k = x.shape
    n = codes.shape[0]
    if codes.shape[1] != k:
        raise ValueError(f"x has {k} features; the FP8 weight {codes.shape[1]}.")
    if m > SMALL_M_MAX:
        raise ValueError(f"The FP8 skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out_dtype = out_dtype or x.dtype
    cfg = dict(config or fp8_gemv_config(m, n, k, _num_sms(x.device)))
    split = cfg.pop("split")
    block_k = cfg["BLOCK_K"]
    k_blocks = triton.cdiv(k, block_k)
    per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k, per_split)
    even_k = k % block_k == 0 and per_split % block_k == 0
    if split == 1:
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        _fp8_gemv_kernel[grid](x, codes, scale.reshape(-1), y, n, k, per_split,
                               codes.stride(0), SPLIT=split, EVEN_K=even_k, **cfg)
    return y if split == 1 else y.to(out_dtype)
