"""Triton W4A16 GEMV for decode at batch 1: y [1, N] = x [1, K] @ W^T
with W 4-bit, grouped along K, in `Int4Weight`'s layout (qweight int32 [K / 8, N], nibble
j of row i is input 8 i + j; scales fp16 [G, N]; zeros uint8 [G, N]).

At decode the product is a weight stream of half a byte per weight: at 4.8 TB/s an H200 SM
must take ~38 weights per clock out of its 128 lane-operations, so the work per weight
decides the speed. This kernel spends three operations on one (no tensor cores, whose
operand layout would need the weights moved through shared memory):
* a code q becomes the float32 16 + q by bit operations only: its nibble shifted to
  mantissa bits 19..22, masked and or-ed with the bits of 16.0 (a shift and one LOP3; no
  integer -> float conversion, which runs at a quarter of the rate);
* one FMA with its input, into a [BLOCK_K / 8, BLOCK_N] float32 accumulator of
  partial sums (each packed int32 row p holds inputs 8 p .. 8 p + 7);
* the zero point and scale leave the inner loop: per group and element,
  acc += s (sum_j x_j (16 + q_j) - (16 + z) sum_j x_j), and the accumulator is reduced over
  K once, at the end.
Each program owns BLOCK_N output channels (N contiguous: coalesced loads) and a K range; K
is split (float32 partial sums added atomically) only where the N tiles alone leave SMs
idle. Configurations come from the shapes only: CUDA-graph capturable. More rows are
the dequant-GEMM's (`Int4Weight.path`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.quantization.int4 import GEMV_MAX_M
from pagedllm.quantization.int4_kernels import _num_sms, check_int4_input

SMALL_M_MAX = GEMV_MAX_M  # rows served by this kernel: one


@triton.jit
def _plus16(packed, J: tl.constexpr):
    """Nibble J of int32 `packed` -> the float32 16 + q, by bit operations."""
    if J < 5:
        bits = packed << (19 - 4 * J)
    else:
        bits = packed >> (4 * J - 19)
    return ((bits & 0x00780000) | 0x41800000).to(tl.float32, bitcast=True)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, k_per_split,
    stride_qk, stride_sg, stride_zg,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Program (n tile, k split); every K tile lies in one group (BLOCK_K divides GROUP)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        packed = tl.load(qw_ptr + (k0 // 8 + offs_p)[:, None].to(tl.int64) * stride_qk
                         + offs_n[None, :], mask=n_mask[None, :], other=0)
        g = k0 // GROUP
        z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        part = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        for j in tl.static_range(8):
            x = tl.load(x_ptr + k0 + j + 8 * offs_p).to(tl.float32)
            xsum += x
            part += _plus16(packed, j) * x[:, None]
        acc += (part - xsum[:, None] * (z + 16.0)[None, :]) * s[None, :]
    out = tl.sum(acc, axis=0)
    if SPLIT == 1:
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, out, mask=n_mask, sem="relaxed")


def int4_gemv_config(m: int, n: int, k: int, group: int, num_sms: int) -> dict[str, int]:
    """Tile, K split and launch settings for one row (shapes only)."""
    if m > SMALL_M_MAX:
        raise ValueError(f"The 4-bit skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    if group % 16:
        raise ValueError(f"The 4-bit kernel needs a group size divisible by 16, got {group}.")
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    # 64 inputs per K tile: 128 measured ~7% faster per linear in isolation on an H200 but
    # 7% slower end to end at batch 1 (benchmarks/RESULTS.md, fifth GPU session).
    block_k = next(b for b in (64, 32, 16) if group % b == 0)
    tiles = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split = 1
    if tiles < num_sms:
        split = max(1, min(k_blocks, (4 * num_sms) // tiles))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, split=split, num_warps=4, num_stages=4)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor, group_size: int,
              config: dict[str, int] | None = None) -> torch.Tensor:
    """x [1, K] (fp16 / bf16 / fp32) @ W^T -> [1, N] in x's dtype (see the module
    docstring)."""
    x, m, n, k = check_int4_input(x, qweight)
    if m > SMALL_M_MAX:
        raise ValueError(f"The 4-bit skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    cfg = dict(config or int4_gemv_config(m, n, k, group_size, _num_sms(x.device)))
    split = cfg.pop("split")
    block_k = cfg["BLOCK_K"]
    if group_size % block_k or block_k % 16:
        raise ValueError(f"BLOCK_K {block_k} does not fit group {group_size}.")
    per_split = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    split = triton.cdiv(k, per_split)
    if split == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        _int4_gemv_kernel[grid](
            x, qweight, scales, zeros, y, n, k, per_split,
            qweight.stride(0), scales.stride(0), zeros.stride(0),
            GROUP=group_size, SPLIT=split, **cfg)
    return y if split == 1 else y.to(x.dtype)
