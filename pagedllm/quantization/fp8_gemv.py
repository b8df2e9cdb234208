"""Triton FP8 weight-only GEMV for decode at batch 1: y [1, N] = x [1, K] @ (codes *
scale)^T, activations in bf16 / fp16 / fp32 (no activation quantization).

One row makes the product a weight stream: 1 byte per weight read once and two flops on
it. Tensor cores do not help there (an M = 1 tile wastes 15 of their 16 rows, and feeding
them needs the converted weights moved into their operand layout through shared memory),
and ``_scaled_mm`` adds a per-token quantization launch. So this kernel streams the e4m3
codes [N, K] (K contiguous: 16-byte vector loads), converts them to float32 in registers
and multiply-adds on the CUDA cores:

* each program owns BLOCK_N output channels and a K range; its tiles are [BLOCK_N,
  BLOCK_K / VEC, VEC] codes, each thread sums its VEC products (VEC consecutive inputs of
  one row) and adds that to a float32 accumulator VEC times smaller than the tile, which is
  reduced over K once, at the end; the per-channel scale is applied once;
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

from pagedllm.pdl import launch_options, pdl_enabled, pdl_trigger, pdl_wait
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


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, n_out, K, k_per_split, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, SPLIT: tl.constexpr,
    GATED: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PDL: tl.constexpr,
):
    """Program (n tile, k split): y[n] (+)= scale[n] * sum over its K range of x[k] W[n, k];
    gated, rows n (gate) and n_out + n (up) together. EVEN_K / EVEN_N: whole tiles along K /
    N (the loads need no mask). PDL: see pagedllm.pdl."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_k = (tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None]
    rows = offs_n[:, None, None]
    row_mask = n_mask[:, None, None]
    gate_rows = w_ptr + rows.to(tl.int64) * stride_wn
    up_rows = w_ptr + (n_out + rows).to(tl.int64) * stride_wn
    gate = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        # x as a broadcast over the tile's rows, in the weight tile's own layout (served by
        # L1): a [BLOCK_K] load would be moved into that layout through shared memory.
        x_tile = x_ptr + k + 0 * rows
        if EVEN_K and EVEN_N:
            w_gate = tl.load(gate_rows + k)
            if GATED:
                w_up = tl.load(up_rows + k)
            x = tl.load(x_tile)
        else:
            mask = row_mask if EVEN_K else row_mask & (k < k_hi)
            w_gate = tl.load(gate_rows + k, mask=mask, other=0.0)
            if GATED:
                w_up = tl.load(up_rows + k, mask=mask, other=0.0)
            x = tl.load(x_tile, mask=mask, other=0.0)
        x = x.to(tl.float32)
        gate += tl.sum(w_gate.to(tl.float32) * x, axis=2)
        if GATED:
            up += tl.sum(w_up.to(tl.float32) * x, axis=2)
    gate_out = tl.sum(gate, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    up_out = gate_out
    if GATED:
        up_out = tl.sum(up, axis=1) * tl.load(s_ptr + n_out + offs_n, mask=n_mask, other=0.0)
    finish_gemv(gate_out, up_out, y_ptr, part_ptr, count_ptr, offs_n, n_mask, n_out, pid_n,
                pid_s, SPLIT, GATED)


def fp8_gemv_config(m: int, n: int, k: int, num_sms: int,
                    gated: bool = False) -> dict[str, int]:
    """Tile, K split and launch settings for one row (shapes only; `n` counts both halves
    when gated). 2-row tiles of 2048 inputs (gated: 2 gate and 2 up rows of 1024), 16
    products summed per thread: the best or within 3.5% of the best of the forms swept on an
    H200 at every Llama-3-8B linear (benchmarks/RESULTS.md)."""
    if m > SMALL_M_MAX:
        raise ValueError(f"The FP8 skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    block_n, vec = 2, 16
    block_k = max(vec, min(1024 if gated else 2048, triton.next_power_of_2(k)))
    tiles = triton.cdiv(n // 2 if gated else n, block_n)
    split = split_for(tiles, triton.cdiv(k, block_k), num_sms)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, VEC=vec, split=split, num_warps=4,
                num_stages=3)


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
        pdl = pdl_enabled(x.device)
        _fp8_gemv_kernel[(tiles, split)](x, codes, scale.reshape(-1), y, part, counts, n_out,
                                         k, per_split, codes.stride(0), SPLIT=split,
                                         GATED=gated, EVEN_K=even_k,
                                         EVEN_N=n_out % cfg["BLOCK_N"] == 0, PDL=pdl,
                                         **launch_options(pdl), **cfg)
    return y
