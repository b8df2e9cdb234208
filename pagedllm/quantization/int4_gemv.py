"""Triton W4A16 GEMV for decode at batch 1: y [1, N] = x [1, K] @ W^T
with W 4-bit, grouped along K, in `Int4Weight`'s layout (qweight int32 [K / 8, N], nibble
j of row i is input 8 i + j; scales fp16 [G, N]; zeros uint8 [G, N]). Gated (the fused
gate / up projection of an MLP), the kernel computes silu(x W_gate^T) * (x W_up^T) for the
two halves of N in one pass.

At decode the product is a weight stream of half a byte per weight. Two things decide its
speed:
* bytes in flight: an H200 needs a few MB of loads outstanding to reach its bandwidth, so
  each program loads a [BLOCK_K / 8, BLOCK_N] tile of ~8 KB per iteration (BLOCK_K spans
  several groups: each packed row p gathers its own group's zero point and scale) and the
  grid has a few programs per SM (K split where the N tiles alone are too few);
* the work per weight (an SM takes ~38 weights per clock at 4.8 TB/s out of its 128
  lane-operations): a code q becomes a float32 bias + q by one mask-and-or, no integer ->
  float conversion. A nibble at position 3 or 4 of a word lies in a float32's mantissa
  with unit 1 under the exponent of 2048 or 128, so each word is rotated three times (by
  2, 4 and 6 nibbles) and every nibble is then masked out of one of the four at one of
  those two positions: 11 operations for 8 codes, plus one FMA each with its input into
  a float32 tile of partial sums. The biases, the zero point and the scale leave the
  per-weight work: per packed row and channel, acc += s (sum_j x_j (b_j + q_j) -
  sum_j b_j x_j - z sum_j x_j). The largest bias, 2048, leaves the float32 partial sums
  ~2^-13 of their magnitude before the bias is taken off, far below bf16's rounding.
  The tile is reduced over K once, at the end.
A K split ends in `gemv_split.finish_gemv` (the last program of a tile sums the partials;
no extra launch). Configurations come from the shapes only: CUDA-graph capturable. More
rows are the dequant-GEMM's (`Int4Weight.path`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.ops.triton_prefill_attention import interpreting
from pagedllm.pdl import launch_options, pdl_enabled, pdl_trigger, pdl_wait
from pagedllm.quantization.gemv_split import (
    GemvScratch,
    finish_gemv,
    k_ranges,
    split_buffers,
    split_for,
)
from pagedllm.quantization.int4 import GEMV_MAX_M
from pagedllm.quantization.int4_kernels import check_int4_input
from pagedllm.utils import sm_count

SMALL_M_MAX = GEMV_MAX_M  # rows served by this kernel: one
_TILE_INT32 = 2048  # packed int32 per program and iteration (8 KB)


@triton.jit
def _biased(word, POS: tl.constexpr, INTERPRET: tl.constexpr):
    """The nibble of uint32 `word` at nibble position POS (3 or 4) as the float32
    bias + q (2048 + q at 3, 128 + q at 4) by one mask-and-or: no shift, no conversion.
    On the GPU one LOP3 with both constants in the instruction: written as Triton ops,
    ptxas re-materializes the mask into a register for every LOP3 (591 instead of 481
    instructions per 128 weights in the sm_90 loop)."""
    if INTERPRET:  # the interpreter runs no inline PTX
        if POS == 3:
            bits = (word & 0x0000F000) | 0x45000000
        else:
            bits = (word & 0x000F0000) | 0x43000000
    elif POS == 3:  # LUT 0xEA: (a & b) | c
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x0000F000, 0x45000000, 0xEA;",
                                         "=r,r", [word], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F0000, 0x43000000, 0xEA;",
                                         "=r,r", [word], dtype=tl.uint32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rotl(word, BITS: tl.constexpr):
    return (word << BITS) | (word >> (32 - BITS))


@triton.jit
def _x(x_ptr, k0, J: tl.constexpr, offs_p, p_mask, EVEN_K: tl.constexpr):
    """Input J of every packed row of the tile, in float32."""
    if EVEN_K:
        return tl.load(x_ptr + k0 + J + 8 * offs_p).to(tl.float32)
    return tl.load(x_ptr + k0 + J + 8 * offs_p, mask=p_mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_sum(acc, x_ptr, qw_ptr, s_ptr, z_ptr, k0, offs_p, p_mask, cols, n_mask,
              stride_qk, stride_sg, stride_zg, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
              INTERPRET: tl.constexpr):
    """acc + this K tile's contribution for output channels `cols`."""
    rows = k0 // 8 + offs_p
    if EVEN_K:
        mask = n_mask[None, :]
    else:
        mask = p_mask[:, None] & n_mask[None, :]
    packed = tl.load(qw_ptr + rows[:, None].to(tl.int64) * stride_qk + cols[None, :],
                     mask=mask, other=0).to(tl.uint32, bitcast=True)
    g = (k0 + 8 * offs_p) // GROUP
    z = tl.load(z_ptr + g[:, None] * stride_zg + cols[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + g[:, None] * stride_sg + cols[None, :], mask=mask, other=0.0)
    x0 = _x(x_ptr, k0, 0, offs_p, p_mask, EVEN_K)
    x1 = _x(x_ptr, k0, 1, offs_p, p_mask, EVEN_K)
    x2 = _x(x_ptr, k0, 2, offs_p, p_mask, EVEN_K)
    x3 = _x(x_ptr, k0, 3, offs_p, p_mask, EVEN_K)
    x4 = _x(x_ptr, k0, 4, offs_p, p_mask, EVEN_K)
    x5 = _x(x_ptr, k0, 5, offs_p, p_mask, EVEN_K)
    x6 = _x(x_ptr, k0, 6, offs_p, p_mask, EVEN_K)
    x7 = _x(x_ptr, k0, 7, offs_p, p_mask, EVEN_K)
    # Nibble j sits at position 3 or 4 of the word itself (j = 3, 4) or of one of three
    # rotations (by 2, 4 and 6 nibbles): odd j at 3 (bias 2048), even j at 4 (bias 128).
    rot2 = _rotl(packed, 8)
    rot4 = _rotl(packed, 16)
    rot6 = _rotl(packed, 24)
    part = _biased(rot4, 4, INTERPRET) * x0[:, None]
    part += _biased(rot2, 3, INTERPRET) * x1[:, None]
    part += _biased(rot2, 4, INTERPRET) * x2[:, None]
    part += _biased(packed, 3, INTERPRET) * x3[:, None]
    part += _biased(packed, 4, INTERPRET) * x4[:, None]
    part += _biased(rot6, 3, INTERPRET) * x5[:, None]
    part += _biased(rot6, 4, INTERPRET) * x6[:, None]
    part += _biased(rot4, 3, INTERPRET) * x7[:, None]
    odd = x1 + x3 + x5 + x7
    even = x0 + x2 + x4 + x6
    bias_sum = 2048.0 * odd + 128.0 * even  # sum_j bias_j x_j, per packed row
    x_sum = odd + even
    return acc + (part - bias_sum[:, None] - z.to(tl.float32) * x_sum[:, None]) \
        * s.to(tl.float32)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr, n_out, K, k_per_split,
    stride_qk, stride_sg, stride_zg,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    """Program (n tile, k split) over its K range; gated, channels n (gate) and
    n_out + n (up) of the weight. PDL: see pagedllm.pdl."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < n_out
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    gate = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        p_mask = (k0 + 8 * offs_p) < k_hi
        gate = _tile_sum(gate, x_ptr, qw_ptr, s_ptr, z_ptr, k0, offs_p, p_mask, offs_n,
                         n_mask, stride_qk, stride_sg, stride_zg, GROUP, EVEN_K, INTERPRET)
        if GATED:
            up = _tile_sum(up, x_ptr, qw_ptr, s_ptr, z_ptr, k0, offs_p, p_mask,
                           n_out + offs_n, n_mask, stride_qk, stride_sg, stride_zg, GROUP,
                           EVEN_K, INTERPRET)
    finish_gemv(tl.sum(gate, axis=0), tl.sum(up, axis=0), y_ptr, part_ptr, count_ptr,
                offs_n, n_mask, n_out, pid_n, pid_s, SPLIT, GATED)


def int4_gemv_config(m: int, n: int, k: int, group: int, num_sms: int,
                     gated: bool = False) -> dict[str, int]:
    """Tile, K split and launch settings for one row (shapes only; `n` is the weight's
    output channels, both halves when gated)."""
    if m > SMALL_M_MAX:
        raise ValueError(f"The 4-bit skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    if group % 16:
        raise ValueError(f"The 4-bit kernel needs a group size divisible by 16, got {group}.")
    n_out = n // 2 if gated else n
    block_n = 32 if n_out >= 32 else max(16, triton.next_power_of_2(n_out))
    if gated or num_sms <= triton.cdiv(n_out, 32) < 2 * num_sms:
        # under two waves of 32-channel tiles (Llama-3-8B's qkv on an H200: 14.7 us against
        # 10.6 with 16): twice the tiles rather than a K split; gated: two tiles per iteration
        block_n = 16
    block_k = min(8 * _TILE_INT32 // block_n, max(16, triton.next_power_of_2(k)))
    if gated:
        block_k = max(16, block_k // 2)  # two tiles per iteration
    tiles = triton.cdiv(n_out, block_n)
    split = split_for(tiles, triton.cdiv(k, block_k), num_sms)
    # 8 warps (8 packed int32 a thread): on an H200 o 7.25 against 8.93 us, gate_up gated
    # 28.41 against 31.36, down 17.65 against 19.04, qkv 9.68 against 9.53 (RESULTS.md)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, split=split, num_warps=8, num_stages=2)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor, group_size: int, config: dict[str, int] | None = None,
              gated: bool = False, scratch: GemvScratch | None = None) -> torch.Tensor:
    """x [1, K] (fp16 / bf16 / fp32) @ W^T -> [1, N] in x's dtype; gated, silu of the
    first half of N times the second -> [1, N / 2] (see the module docstring)."""
    x, m, n, k = check_int4_input(x, qweight)
    if m > SMALL_M_MAX:
        raise ValueError(f"The 4-bit skinny GEMM serves at most {SMALL_M_MAX} row, got {m}.")
    if gated and n % 2:
        raise ValueError(f"A gated 4-bit GEMV needs an even number of outputs, got {n}.")
    n_out = n // 2 if gated else n
    cfg = dict(config or int4_gemv_config(m, n, k, group_size, sm_count(x.device), gated))
    split = cfg.pop("split")
    block_k = cfg["BLOCK_K"]
    if block_k % 16 or block_k & (block_k - 1):
        raise ValueError(f"BLOCK_K must be a power of two of at least 16, got {block_k}.")
    per_split, split = k_ranges(k, block_k, split)
    tiles = triton.cdiv(n_out, cfg["BLOCK_N"])
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m:
        part, counts = split_buffers(scratch, split, n, tiles, y)
        pdl = pdl_enabled(x.device)
        _int4_gemv_kernel[(tiles, split)](
            x, qweight, scales, zeros, y, part, counts, n_out, k, per_split,
            qweight.stride(0), scales.stride(0), zeros.stride(0),
            GROUP=group_size, SPLIT=split, GATED=gated, EVEN_K=k % per_split == 0,
            INTERPRET=interpreting(), PDL=pdl, **launch_options(pdl), **cfg)
    return y
