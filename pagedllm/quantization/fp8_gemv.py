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
* K is split only where the N tiles alone leave SMs idle (`gemv_split.finish_gemv`: the
  last program of a tile sums the partials, no extra launch); gated (an MLP's fused gate /
  up weight), a program computes gate and up rows together and writes silu(gate) * up;
  the configuration comes from the shapes only (no autotuning, no host syncs),
  so every launch is CUDA-graph capturable.
More rows are the GEMM's (`Fp8Weight.path`): measured on an H200, a kernel of this kind
with [M, BLOCK_N, BLOCK_K] tiles took 2.2x (M = 4) and 3.9x (M = 8) its one-row time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.quantization.fp8 import GEMV_MAX_M
from pagedllm.quantization.gemv_split import (
    GemvScratch,
    finish_gemv,
    k_ranges,
    split_buffers,
    split_for,
)
from pagedllm.utils import sm_count

SMALL_M_MAX = GEMV_MAX_M  # rows served by this kernel: one
_ACC_ELEMENTS = 8192  # float32 accumulator elements per program (64 registers at 4 warps)


@triton.jit
def _fp8_tile_sum(acc, x_ptr, w_rows, k, k_hi, n_mask, EVEN_K: tl.constexpr):
    """acc + the products of this K tile for the weight rows `w_rows`."""
    # x is loaded as a [BLOCK_N, BLOCK_K] broadcast (every row the same addresses, served
    # by L1) in the weight tile's own layout: a [BLOCK_K] load would be moved into that
    # layout through shared memory, with barriers, every iteration.
    x_rows = x_ptr + k[None, :] + 0 * n_mask[:, None].to(tl.int32)
    if EVEN_K:
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
        x = tl.load(x_rows)
    else:
        k_mask = k < k_hi
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_rows, mask=k_mask[None, :], other=0.0)
    return acc + w.to(tl.float32) * x.to(tl.float32)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, n_out, K, k_per_split, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    GATED: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Program (n tile, k split): y[n] (+)= scale[n] * sum over its K range of x[k] W[n, k];
    gated, rows n (gate) and n_out + n (up) together."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n_out
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    gate_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    up_rows = w_ptr + (n_out + offs_n)[:, None].to(tl.int64) * stride_wn
    gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        gate = _fp8_tile_sum(gate, x_ptr, gate_rows, k0 + offs_k, k_hi, n_mask, EVEN_K)
        if GATED:
            up = _fp8_tile_sum(up, x_ptr, up_rows, k0 + offs_k, k_hi, n_mask, EVEN_K)
    gate_out = tl.sum(gate, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    up_out = gate_out
    if GATED:
        up_out = tl.sum(up, axis=1) * tl.load(s_ptr + n_out + offs_n, mask=n_mask, other=0.0)
    finish_gemv(gate_out, up_out, y_ptr, part_ptr, count_ptr, offs_n, n_mask, n_out, pid_n,
                pid_s, SPLIT, GATED)


def fp8_gemv_config(m: int, n: int, k: int, num_sms: int,
                    gated: bool = False) -> dict[str, int]:
    """Tile, K split and launch settings for one row (shapes only; see the module
    docstring for the reasoning; `n` counts both halves when gated)."""
    if m > SMALL_M_MAX:
        raise ValueError(f"The FP8 skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    block_n = 8
    elements = _ACC_ELEMENTS // 2 if gated else _ACC_ELEMENTS  # gated: two accumulators
    block_k = max(32, min(elements // block_n, triton.next_power_of_2(k)))
    tiles = triton.cdiv(n // 2 if gated else n, block_n)
    split = split_for(tiles, triton.cdiv(k, block_k), num_sms)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, split=split, num_warps=4, num_stages=3)


def fp8_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
             out_dtype: torch.dtype | None = None, config: dict[str, int] | None = None,
             gated: bool = False, scratch: GemvScratch | None = None) -> torch.Tensor:
    """x [1, K] (bf16 / fp16 / fp32) @ (codes [N, K] e4m3 * scale [N] float32)^T -> [1, N]
    in `out_dtype` (default x's dtype); gated, silu of the first half of N times the
    second -> [1, N / 2]."""
    m, k = x.shape
    n = codes.shape[0]
    if codes.shape[1] != k:
        raise ValueError(f"x has {k} features; the FP8 weight {codes.shape[1]}.")
    if m > SMALL_M_MAX:
        raise ValueError(f"The FP8 skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    if gated and n % 2:
        raise ValueError(f"A gated FP8 GEMV needs an even number of outputs, got {n}.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out_dtype = out_dtype or x.dtype
    n_out = n // 2 if gated else n
    cfg = dict(config or fp8_gemv_config(m, n, k, sm_count(x.device), gated))
    split = cfg.pop("split")
    block_k = cfg["BLOCK_K"]
    per_split, split = k_ranges(k, block_k, split)
    even_k = k % block_k == 0 and per_split % block_k == 0
    tiles = triton.cdiv(n_out, cfg["BLOCK_N"])
    y = torch.empty((m, n_out), dtype=out_dtype, device=x.device)
    if m:
        part, counts = split_buffers(scratch, split, n, tiles, y)
        _fp8_gemv_kernel[(tiles, split)](x, codes, scale.reshape(-1), y, part, counts, n_out,
                                         k, per_split, codes.stride(0), SPLIT=split,
                                         GATED=gated, EVEN_K=even_k, **cfg)
    return y
