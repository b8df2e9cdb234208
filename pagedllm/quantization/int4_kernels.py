"""Triton W4A16 matmul: y [M, N] = x [M, K] @ W^T with W 4-bit, grouped along K.

W is int32 [K / 8, N] (nibble j of row i: input 8 i + j), scales fp16 [G, N], zeros uint8
[G, N], group size GROUP inputs. Every K tile lies in one group (BLOCK_K divides GROUP), so
a tile is dot(x, q - z) in integer-valued bf16 / fp16 (exact) times that group's scales,
accumulated in float32.

Two configurations: prefill (many rows) tiles M and N; decode (few rows: a GEMV in effect)
uses 16-row tiles and splits K over programs so that the weight stream fills the GPU, the
partial sums reduced in float32. Configurations are chosen from the shapes only (no
autotuning), so every launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.utils import sm_count

_DECODE_MAX_M = 16


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, k_per_split, iters,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_ym, stride_ys,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (m tile, n tile, k split): sum over its K range of x tile @ dequant(W tile)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_K // 8)
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_s * k_per_split
    for i in range(0, iters):
        k0 = k_start + i * BLOCK_K
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        p_mask = (k0 // 8 + offs_p) < K // 8
        packed = tl.load(qw_ptr + (k0 // 8 + offs_p)[:, None].to(tl.int64) * stride_qk
                         + offs_n[None, :], mask=p_mask[:, None] & n_mask[None, :], other=0)
        q = (packed[:, None, :] >> shifts) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
        g = k0 // GROUP
        z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_mask, other=0).to(tl.int32)
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = (q - z[None, :]).to(x.dtype)
        part = tl.dot(x, w)
        acc += part * s[None, :]
    y = y_ptr + pid_s.to(tl.int64) * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym \
        + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(group: int, k: int) -> int:
    for b in (128, 64, 32, 16):
        if group % b == 0 and b <= max(16, k):
            return b
    raise ValueError(f"The 4-bit kernel needs a group size divisible by 16, got {group}.")


def int4_config(m: int, n: int, k: int, group: int, device: torch.device) -> dict[str, int]:
    """Tiles, split and launch settings for an [M, K] x [K, N] product (shapes only)."""
    block_k = _block_k(group, k)
    if m <= _DECODE_MAX_M:
        block_n = 64 if n >= 64 else 32
        tiles = triton.cdiv(n, block_n)
        k_tiles = triton.cdiv(k, block_k)
        split = max(1, min(k_tiles, (4 * sm_count(device)) // max(tiles, 1)))
        iters = triton.cdiv(k_tiles, split)
        split = triton.cdiv(k_tiles, iters)
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, split=split, iters=iters,
                    num_warps=4, num_stages=4)
    block_m = 64 if m <= 256 else 128
    block_k = min(block_k, 64)
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=block_k, split=1,
                iters=triton.cdiv(k, block_k), num_warps=4 if block_m == 64 else 8,
                num_stages=3)


def check_int4_input(x: torch.Tensor, qweight: torch.Tensor
                     ) -> tuple[torch.Tensor, int, int, int]:
    """x with unit stride along K, and (M, N, K); ValueError when x's K is not the weight's."""
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"x has {k} features; the 4-bit weight {qweight.shape[0] * 8}.")
    return (x if x.stride(-1) == 1 else x.contiguous()), m, n, k


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group_size: int,
                config: dict[str, int] | None = None) -> torch.Tensor:
    """x [M, K] (fp16 / bf16) @ W^T -> [M, N] in x's dtype (see the module docstring)."""
    x, m, n, k = check_int4_input(x, qweight)
    cfg = dict(config or int4_config(m, n, k, group_size, x.device))
    split = cfg.pop("split")
    iters = cfg.pop("iters")
    if split == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    if m == 0:
        return y if split == 1 else y.sum(0).to(x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    _int4_matmul_kernel[grid](
        x, qweight, scales, zeros, y, m, n, k, iters * cfg["BLOCK_K"], iters,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0),
        y.stride(-2), y.stride(0) if split > 1 else 0, GROUP=group_size, **cfg,
    )
    return y if split == 1 else y.sum(0).to(x.dtype)
