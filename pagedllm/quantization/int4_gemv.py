"""Triton W4A16 skinny GEMM for decode (M <= `SMALL_M_MAX` rows): y [M, N] = x [M, K] @ W^T
with W 4-bit, grouped along K, in `Int4Weight`'s layout (qweight int32 [K / 8, N], nibble
j of row i is input 8 i + j; scales fp16 [G, N]; zeros uint8 [G, N]).

What it does differently from the dequant-GEMM of `int4_kernels`:
* No integer -> float conversion per weight. At 4.8 TB/s a 4-bit stream is ~38 weights
  per SM per clock on an H200, and I2F runs at 16 per SM per clock, so a kernel that
  converts every code cannot pass ~40% of the bandwidth. Here a code q becomes the 16-bit
  float 16 + q by bit operations only (bf16: ``(q << 3) | 0x4180``; fp16:
  ``(q << 6) | 0x4C00``), and the zero point leaves the inner loop:
  sum_k x_k (q_k - z) s = s (sum_k x_k (16 + q_k) - (16 + z) sum_k x_k).
* No reshape of the unpacked codes: nibble j of a [BLOCK_K / 8, BLOCK_N] tile multiplies
  the inputs 8 p + j (strided x loads, from L1), so the tile is eight [16, BLOCK_K / 8] x
  [BLOCK_K / 8, BLOCK_N] dots (NIBBLE_DOTS; needs BLOCK_K >= 128) - or, as the fallback
  for groups under 128 inputs, one dot over the reshaped [BLOCK_K, BLOCK_N] tile.
* Many programs: N / 64 tiles, and a split over K (float32 partial sums added
  atomically) only where the tiles cannot give every SM a program; the split aims at
  ~4 programs per SM so that ~16 KB of 4 KB weight tiles are in flight per SM with 4
  pipeline stages.
Configurations come from the shapes only: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.quantization.int4 import GEMV_MAX_M
from pagedllm.quantization.int4_kernels import _num_sms, check_int4_input

SMALL_M_MAX = GEMV_MAX_M  # rows served by this kernel (the dispatcher's threshold)


@triton.jit
def _to_float_plus16(q, DTYPE: tl.constexpr):
    """int32 codes 0..15 -> 16 + q in DTYPE, by bit operations (fp32: a plain convert)."""
    if DTYPE == tl.bfloat16:
        return ((q << 3) | 0x4180).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        return ((q << 6) | 0x4C00).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return (q + 16).to(DTYPE)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NIBBLE_DOTS: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (n tile, k split); every K tile lies in one group (BLOCK_K divides GROUP)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_K // 8)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        packed = tl.load(qw_ptr + (k0 // 8 + offs_p)[:, None].to(tl.int64) * stride_qk
                         + offs_n[None, :], mask=n_mask[None, :], other=0)
        g = k0 // GROUP
        z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NIBBLE_DOTS:
            for j in tl.static_range(8):
                w = _to_float_plus16((packed >> (4 * j)) & 0xF, dtype)
                x = tl.load(x_rows + (k0 + 8 * offs_p + j)[None, :], mask=m_mask[:, None],
                            other=0.0)
                xsum += tl.sum(x.to(tl.float32), axis=1)
                part = tl.dot(x, w, part, input_precision=PRECISION)
        else:
            shifts = (tl.arange(0, 8) * 4)[None, :, None]
            q = tl.reshape((packed[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N))
            x = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=m_mask[:, None],
                        other=0.0)
            xsum = tl.sum(x.to(tl.float32), axis=1)
            part = tl.dot(x, _to_float_plus16(q, dtype), part, input_precision=PRECISION)
        acc += (part - xsum[:, None] * (z + 16.0)[None, :]) * s[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask, sem="relaxed")


def int4_gemv_config(m: int, n: int, k: int, group: int, num_sms: int) -> dict[str, int]:
    """Tiles, K split and launch settings for M <= SMALL_M_MAX rows (shapes only)."""
    if m > SMALL_M_MAX:
        raise ValueError(f"The 4-bit skinny GEMM serves at most {SMALL_M_MAX} rows, got {m}.")
    block_k = next((b for b in (128, 64, 32, 16) if group % b == 0), None)
    if block_k is None:
        raise ValueError(f"The 4-bit kernel needs a group size divisible by 16, got {group}.")
    block_n = 64 if n >= 64 else 32
    tiles = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split = 1
    if tiles < num_sms:
        split = max(1, min(k_blocks, (4 * num_sms) // tiles))
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, NIBBLE_DOTS=block_k >= 128,
                split=split, num_warps=4, num_stages=4)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor, group_size: int,
              config: dict[str, int] | None = None) -> torch.Tensor:
    """x [M, K] (fp16 / bf16) @ W^T -> [M, N] in x's dtype (see the module docstring)."""
    x, m, n, k = check_int4_input(x, qweight)
    cfg = dict(config or int4_gemv_config(m, n, k, group_size, _num_sms(x.device)))
    split = cfg.pop("split")
    block_k = cfg["BLOCK_K"]
    if group_size % block_k or (cfg["NIBBLE_DOTS"] and block_k < 128):
        raise ValueError(f"BLOCK_K {block_k} does not fit group {group_size} / NIBBLE_DOTS.")
    per_split = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    split = triton.cdiv(k, per_split)
    if split == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        _int4_gemv_kernel[grid](
            x, qweight, scales, zeros, y, m, n, k, per_split,
            x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
            GROUP=group_size, SPLIT=split,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return y if split == 1 else y.to(x.dtype)
