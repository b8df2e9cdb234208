"""Fused MoE for decode-sized batches: two GEMV kernels, no sorting, no padding.

With a few (token, expert) pairs the grouped GEMM of `triton_moe` spends more time on
bookkeeping than on reading weights: the alignment kernel, BLOCK_M-row tiles of which one row
is real, and a separate sum of each token's top-k rows. Here:

1. `_gate_up_kernel`: one program per (pair, BLOCK_N columns of the FFN dimension) reads its
   expert's gate and up rows once and writes silu(x W1^T) * (x W3^T) for that pair.
2. `_down_kernel`: one program per (token, BLOCK_N hidden columns) walks the token's top-k
   experts, scales each expert's product by its routing weight and sums them in fp32, so the
   top-k sum needs no kernel of its own.

Two launches of fixed shape and no host sync: the path is captured in CUDA graphs. A pair
whose expert another pair shares reads that expert's rows again (from L2 at these sizes),
which is why the path is for small batches only (`DECODE_MAX_PAIRS`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DECODE_MAX_PAIRS = 64  # (token, expert) pairs up to which experts() takes this path


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, N, K,
                    stride_xm, stride_we, stride_wn, stride_om,
                    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[p, n] = silu(x[p // TOP_K] . W[e, n]) * (x[p // TOP_K] . W[e, N + n]), e = ids[p].
    W is [E, 2N, K] with K contiguous."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    token = pair // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + token * stride_xm
    gate_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_row + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        mask = n_mask[:, None] & k_mask[None, :]
        gate = tl.load(gate_ptrs + k0, mask=mask, other=0.0)
        up = tl.load(gate_ptrs + N * stride_wn + k0, mask=mask, other=0.0)
        acc_gate += tl.sum(gate.to(tl.float32) * x[None, :], axis=1)
        acc_up += tl.sum(up.to(tl.float32) * x[None, :], axis=1)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(out_ptr + pair * stride_om + offs_n, act.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _down_kernel(act_ptr, w_ptr, ids_ptr, weights_ptr, out_ptr, N, K,
                 stride_am, stride_we, stride_wn, stride_om,
                 TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, n] = sum_j weights[t, j] * (act[t * TOP_K + j] . W[ids[t, j], n]); W is
    [E, N, K] with K contiguous."""
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
        a_row = act_ptr + pair * stride_am
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_row + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        total += acc * tl.load(weights_ptr + pair)
    tl.store(out_ptr + token * stride_om + offs_n, total.to(out_ptr.dtype.element_ty),
             mask=n_mask)


# Tile shapes (BLOCK_N, BLOCK_K, num_warps) of the two kernels.
GATE_UP_CONFIG = (16, 256, 4)
DOWN_CONFIG = (16, 256, 4)


def decode_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   gate_up_config: tuple[int, int, int] = GATE_UP_CONFIG,
                   down_config: tuple[int, int, int] = DOWN_CONFIG) -> torch.Tensor:
    """Same contract as reference.torch_experts, for few pairs: x [T, H], w13 [E, 2I, H],
    w2 [E, H, I], topk_weights / topk_ids [T, k]."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("decode_experts needs expert weights contiguous along their last dim")
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    act = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = gate_up_config
    _gate_up_kernel[(num_tokens * top_k, triton.cdiv(inter, block_n))](
        x, w13, ids, act, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1),
        act.stride(0), TOP_K=top_k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    block_n, block_k, warps = down_config
    _down_kernel[(num_tokens, triton.cdiv(hidden, block_n))](
        act, w2, ids, weights, out, hidden, inter, act.stride(0), w2.stride(0), w2.stride(1),
        out.stride(0), TOP_K=top_k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out
