"""Paged causal attention for a flat mixed batch (prefill chunks with cached prefix + decodes).

One program handles ``BLOCK_Q`` query tokens of one request times all ``GROUP = Hq // Hkv``
query heads of one KV head, stacked into the M dimension of the matrix products, so every
K/V tile is read once per KV head group. Programs find their request by a binary search over
``query_start_loc`` (no host work beyond the launch), heavier (later) query blocks run first.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,
    n0,
    kv_end,
    qpos,
    window,
    qk_scale,
    kv_head_off,
    stride_c_blk,
    stride_c_slot,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with keys ``n0 .. n0 + BLOCK_N``.

    MASK=False: every key of the tile is valid for every row (no bounds/causal checks).
    Scores are in the log2 domain (``qk_scale`` includes log2(e)).
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    if MASK:
        nmask = offs_n < kv_end
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=nmask, other=0)
    else:
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE)
    row_off = blk.to(tl.int64) * stride_c_blk + (offs_n % BLOCK_SIZE) * stride_c_slot + kv_head_off
    kv_off = row_off[:, None] + offs_d[None, :]
    if MASK:
        if D_PAD == HEAD_DIM:
            ld_mask = nmask[:, None]
        else:
            ld_mask = nmask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + kv_off, mask=ld_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=ld_mask, other=0.0)
    elif D_PAD == HEAD_DIM:
        k = tl.load(k_cache_ptr + kv_off)
        v = tl.load(v_cache_ptr + kv_off)
    else:
        dmask = offs_d[None, :] < HEAD_DIM
        k = tl.load(k_cache_ptr + kv_off, mask=dmask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=dmask, other=0.0)
    # An FP8 cache is read in the query dtype (its scales are applied by the caller).
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    # fp32 models get exact fp32 products (Triton's default for fp32 is tf32).
    if q.dtype == tl.float32:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASK:
        valid = nmask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= qpos[:, None])
        if SLIDING:
            valid = valid & (offs_n[None, :] > qpos[:, None] - window)
        qk = tl.where(valid, qk, float("-inf"))
    # m is kept in the scaled (log2) domain; scale and max subtraction fuse into one FMA.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if v.dtype == tl.float32:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _attend_range(
    acc,
    l_i,
    m_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,
    lo,
    hi,
    kv_end,
    qpos,
    window,
    qk_scale,
    kv_head_off,
    stride_c_blk,
    stride_c_slot,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """_attend_tile over the key tiles starting at lo, lo + BLOCK_N, ... < hi.

    Compiled: a pipelined ``for range`` loop. Under the interpreter, a ``while`` loop, since
    its program ids are 1-element arrays that newer numpy refuses as ``range`` bounds.
    """
    if INTERPRET:
        n0 = lo
        while n0 < hi:
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0, kv_end, qpos,
                window, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
                BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, MASK, CAUSAL, SLIDING,
            )
            n0 += BLOCK_N
    else:
        for n0 in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0, kv_end, qpos,
                window, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
                BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, MASK, CAUSAL, SLIDING,
            )
    return acc, l_i, m_i


# num_reqs and the block table width change every step: not specialized on, so one
# compiled variant serves every batch.
@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    num_reqs,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_c_blk,
    stride_c_slot,
    stride_c_h,
    stride_bt,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    SLIDING: tl.constexpr,
    KV_FP8: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (query block, kv head): causal attention of BLOCK_Q tokens x GROUP heads.
    KV_FP8: the cache holds k / k_scale and v / v_scale."""
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)

    # Request i owns query blocks [qsl[i] // BLOCK_Q + i, qsl[i + 1] // BLOCK_Q + i + 1).
    # Binary search for the last request whose first block is <= pid.
    lo = 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid
        else:
            hi = mid - 1
    req = lo
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q0 = (pid - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    t_local = q0 + offs_m // G_PAD
    h_off = offs_m % G_PAD
    row_valid = (t_local < q_len) & (h_off < GROUP)
    head = kvh * GROUP + h_off
    tok = (q_start + t_local).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d[None, :] < HEAD_DIM
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & dmask,
        other=0.0,
    )
    qpos = ctx_len + t_local

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    bt_row = block_table_ptr + req * stride_bt
    kv_head_off = kvh * stride_c_h
    first_pos = ctx_len + q0
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)

    if SLIDING:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
        kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, kv_lo, kv_end, kv_end, qpos,
            window, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, True, True, True, INTERPRET,
        )
    else:
        # Keys < full_end are visible to every row of this block: no masking needed.
        full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, 0, full_end, kv_end, qpos,
            window, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, False, True, False, INTERPRET,
        )
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, full_end, kv_end, kv_end, qpos,
            window, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, True, True, False, INTERPRET,
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    tl.store(
        out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dmask,
    )


def interpreting() -> bool:
    """True when kernels run under the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kv_scales(kv_cache: torch.Tensor, k_scale: torch.Tensor | None,
              v_scale: torch.Tensor | None) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(whether the cache is FP8, k scale, v scale) for a kernel launch: unit scales where
    none are given; any tensor stands in for the unused pointers of other caches."""
    if kv_cache.dtype != torch.float8_e4m3fn:
        return False, kv_cache, kv_cache
    if k_scale is None or v_scale is None:
        ones = torch.ones(1, dtype=torch.float32, device=kv_cache.device)
        k_scale = ones if k_scale is None else k_scale
        v_scale = ones if v_scale is None else v_scale
    return True, k_scale, v_scale


def _prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) tuned for H100."""
    if dtype == torch.float32:
        return (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 128, 8, 3
    return 64, 32, 4, 2


def prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_reqs: int,
    num_tokens: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention over a flat batch of variable-length query chunks.

    An FP8 kv_cache holds k / k_scale and v / v_scale (float32 [1] tensors; None: 1.0).

    query ``[T, Hq, D]`` (only the first ``num_tokens`` rows are read/written), kv_cache
    ``[2, num_blocks, block_size, Hkv, D]`` (already holding the new tokens), block_table
    int32 ``[>= num_reqs, max_blocks]``, seq_lens int32, query_start_loc int32 ``[num_reqs+1]``.
    Returns ``out`` ``[T, Hq, D]`` in query dtype.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert num_heads % num_kv_heads == 0
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0 or num_tokens == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    assert out.stride(-1) == 1 and kv_cache.stride(-1) == 1 and block_table.stride(-1) == 1
    group = num_heads // num_kv_heads
    g_pad = triton.next_power_of_2(group)
    cfg_m, cfg_n, cfg_w, cfg_s = _prefill_config(head_dim, query.dtype)
    block_m = block_m or cfg_m
    block_n = block_n or cfg_n
    block_q = max(block_m // g_pad, 1)
    if block_q * g_pad < 16:
        block_q = 16 // g_pad
    num_blocks_q = num_tokens // block_q + num_reqs
    window = int(sliding_window) if sliding_window else 0
    kv_fp8, k_scale, v_scale = kv_scales(kv_cache, k_scale, v_scale)
    _prefill_kernel[(num_blocks_q, num_kv_heads)](
        out,
        query,
        kv_cache[0],
        kv_cache[1],
        block_table,
        seq_lens,
        query_start_loc,
        k_scale,
        v_scale,
        scale * LOG2E,
        num_reqs,
        window,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_table.stride(0),
        GROUP=group,
        G_PAD=g_pad,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        SLIDING=window > 0,
        KV_FP8=kv_fp8,
        INTERPRET=interpreting(),
        num_warps=num_warps or cfg_w,
        num_stages=num_stages or cfg_s,
    )
    return out
