"""Paged decode attention (one query token per request) with split-K flash-decoding.

Grid ``(batch, num_kv_heads, num_splits)``: each program loads the ``GROUP = Hq // Hkv`` query
heads of its KV head as one ``[G_PAD, D]`` tile (the M dimension of ``tl.dot``), so each K/V
tile is read once per KV head, and walks its split's share of the context. With more than one
split, partial outputs + log-sum-exp go to a scratch buffer and a reduce kernel merges them.

The grid depends only on the (padded) batch size and constants, the kernels read sequence
lengths on the device only, and rows with ``seq_len == 0`` write zeros: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.ops.triton_prefill_attention import (
    LOG2E,
    _attend_range,
    interpreting,
    kv_scales,
)
from pagedllm.pdl import pdl_enabled, pdl_trigger, pdl_wait
from pagedllm.utils import sm_count

MAX_SPLITS = 16


@triton.jit
def _fp8_pairs_to_fp16(words, INTERPRET: tl.constexpr):
    """uint16 words of two e4m3 codes -> (low codes, high codes) as fp16, exactly. Compiled:
    per two words, each half's two bytes gathered by one PRMT and converted by one
    ``cvt.rn.f16x2.e4m3x2``. Interpreted: the code's bits moved under fp16's (the bias
    difference 15 - 7 leaves a factor 2^-8, undone by the product with 256)."""
    if INTERPRET:
        c = words.to(tl.uint16, bitcast=True)
        low = ((c << 8) & 0x8000) | ((c << 7) & 0x3F80)
        high = (c & 0x8000) | ((c >> 1) & 0x3F80)
        return (low.to(tl.float16, bitcast=True) * 256.0,
                high.to(tl.float16, bitcast=True) * 256.0)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; .reg .b16 a, z;\n"
        "prmt.b32 t, $2, 0, 0x0020; mov.b32 {a, z}, t; cvt.rn.f16x2.e4m3x2 $0, a;\n"
        "prmt.b32 t, $2, 0, 0x0031; mov.b32 {a, z}, t; cvt.rn.f16x2.e4m3x2 $1, a; }",
        "=r,=r,r", [words], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _decode_tile_fp8(acc_lo, acc_hi, l_i, m_i, q, k_cache_ptr, v_words_ptr, bt_row_ptr, n0,
                     kv_end, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
                     BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """`_attend_tile` over an FP8 cache with fp16 products (q fp16). K converts to fp16 in
    the product's layout; V is read as uint16 words of two neighbouring channels and split
    into the even channels (acc_lo) and the odd ones (acc_hi): a 16-bit tile that the
    product reads with transposing matrix loads, where an 8-bit V tile is gathered byte by
    byte from shared memory."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_w = tl.arange(0, HEAD_DIM // 2)
    if MASK:
        nmask = offs_n < kv_end
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=nmask, other=0)
    else:
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE)
    row_off = blk.to(tl.int64) * stride_c_blk + (offs_n % BLOCK_SIZE) * stride_c_slot + kv_head_off
    if MASK:
        k = tl.load(k_cache_ptr + row_off[:, None] + offs_d[None, :], mask=nmask[:, None],
                    other=0.0)
        words = tl.load(v_words_ptr + row_off[:, None] // 2 + offs_w[None, :],
                        mask=nmask[:, None], other=0)
    else:
        k = tl.load(k_cache_ptr + row_off[:, None] + offs_d[None, :])
        words = tl.load(v_words_ptr + row_off[:, None] // 2 + offs_w[None, :])
    qk = tl.dot(q, tl.trans(k.to(tl.float16)))
    if MASK:
        qk = tl.where(nmask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_lo, v_hi = _fp8_pairs_to_fp16(words, INTERPRET)
    p16 = p.to(tl.float16)
    acc_lo = acc_lo * alpha[:, None] + tl.dot(p16, v_lo)
    acc_hi = acc_hi * alpha[:, None] + tl.dot(p16, v_hi)
    return acc_lo, acc_hi, l_i, m_new


@triton.jit
def _decode_range_fp8(acc_lo, acc_hi, l_i, m_i, q, k_cache_ptr, v_words_ptr, bt_row_ptr, lo,
                      hi, kv_end, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
                      BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      HEAD_DIM: tl.constexpr, MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """_decode_tile_fp8 over the key tiles lo, lo + BLOCK_N, ... < hi (see _attend_range)."""
    if INTERPRET:
        n0 = lo
        while n0 < hi:
            acc_lo, acc_hi, l_i, m_i = _decode_tile_fp8(
                acc_lo, acc_hi, l_i, m_i, q, k_cache_ptr, v_words_ptr, bt_row_ptr, n0,
                kv_end, qk_scale, kv_head_off, stride_c_blk, stride_c_slot, BLOCK_N,
                BLOCK_SIZE, HEAD_DIM, MASK, INTERPRET)
            n0 += BLOCK_N
    else:
        for n0 in range(lo, hi, BLOCK_N):
            acc_lo, acc_hi, l_i, m_i = _decode_tile_fp8(
                acc_lo, acc_hi, l_i, m_i, q, k_cache_ptr, v_words_ptr, bt_row_ptr, n0,
                kv_end, qk_scale, kv_head_off, stride_c_blk, stride_c_slot, BLOCK_N,
                BLOCK_SIZE, HEAD_DIM, MASK, INTERPRET)
    return acc_lo, acc_hi, l_i, m_i


# Values that change from step to step are not specialized on (Triton would compile a
# variant for 1 and for multiples of 16 the first time one occurs, in the middle of serving).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    window,
    num_splits,
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
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    SLIDING: tl.constexpr,
    DIRECT: tl.constexpr,
    KV_FP8: tl.constexpr,
    Q_AS_FP16: tl.constexpr,
    FP8_WORDS: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (request, kv head, split): attention of GROUP heads over one context split.
    KV_FP8: the cache holds k / k_scale and v / v_scale. Q_AS_FP16 (a bf16 query over an FP8
    cache): the products run in fp16, q divided by its largest magnitude into [-1, 1] and
    that factor moved into the score scale, because e4m3 -> fp16 is one conversion per two
    codes where e4m3 -> bf16 takes three (the bf16 form ran slower than a bf16 cache).
    PDL: see pagedllm.pdl."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = 0
    if SLIDING:
        start = tl.maximum(seq_len - window, 0)
    ctx = tl.maximum(seq_len - start, 0)
    chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    full_end = lo + tl.maximum((hi - lo) // BLOCK_N, 0) * BLOCK_N

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_g < GROUP
    head = kvh * GROUP + offs_g
    dmask = offs_d[None, :] < HEAD_DIM
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & dmask,
        other=0.0,
    )
    if Q_AS_FP16:
        q_f = q.to(tl.float32)
        q_amax = tl.max(tl.max(tl.abs(q_f), 1), 0)
        q_div = tl.where(q_amax > 0.0, q_amax, 1.0)
        q = (q_f / q_div).to(tl.float16)
        qk_scale = qk_scale * q_div
    qpos = tl.zeros([G_PAD], dtype=tl.int32) + seq_len - 1

    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    m_i = tl.zeros([G_PAD], dtype=tl.float32) - 1.0e30
    bt_row = block_table_ptr + b * stride_bt
    kv_head_off = kvh * stride_c_h
    if FP8_WORDS:
        acc_lo = tl.zeros([G_PAD, HEAD_DIM // 2], dtype=tl.float32)
        acc_hi = tl.zeros([G_PAD, HEAD_DIM // 2], dtype=tl.float32)
        v_words = v_cache_ptr.to(tl.pointer_type(tl.uint16))
        acc_lo, acc_hi, l_i, m_i = _decode_range_fp8(
            acc_lo, acc_hi, l_i, m_i, q, k_cache_ptr, v_words, bt_row, lo, full_end, hi,
            qk_scale, kv_head_off, stride_c_blk, stride_c_slot, BLOCK_N, BLOCK_SIZE,
            HEAD_DIM, False, INTERPRET,
        )
        acc_lo, acc_hi, l_i, m_i = _decode_range_fp8(
            acc_lo, acc_hi, l_i, m_i, q, k_cache_ptr, v_words, bt_row, full_end, hi, hi,
            qk_scale, kv_head_off, stride_c_blk, stride_c_slot, BLOCK_N, BLOCK_SIZE,
            HEAD_DIM, True, INTERPRET,
        )
    else:
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, lo, full_end, hi, qpos,
            window, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, False, False, False, INTERPRET,
        )
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, full_end, hi, hi, qpos,
            window, qk_scale, kv_head_off, stride_c_blk, stride_c_slot,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, True, False, False, INTERPRET,
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out_scale = 1.0 / l_safe
    if KV_FP8:
        out_scale = out_scale * tl.load(v_scale_ptr)
    # part_out [B, Hq, S, D_PAD] fp32, part_lse [B, Hq, S] fp32 (log2 domain).
    row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + head) * num_splits + split
    if FP8_WORDS:  # the even and the odd channels
        offs_w = tl.arange(0, HEAD_DIM // 2)
        _store_out(out_ptr, part_out_ptr, acc_lo * out_scale[:, None], b, head, row,
                   2 * offs_w, row_valid, stride_ot, stride_oh, D_PAD, HEAD_DIM, DIRECT)
        _store_out(out_ptr, part_out_ptr, acc_hi * out_scale[:, None], b, head, row,
                   2 * offs_w + 1, row_valid, stride_ot, stride_oh, D_PAD, HEAD_DIM, DIRECT)
    else:
        _store_out(out_ptr, part_out_ptr, acc * out_scale[:, None], b, head, row, offs_d,
                   row_valid, stride_ot, stride_oh, D_PAD, HEAD_DIM, DIRECT)
    if not DIRECT:
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=row_valid)


@triton.jit
def _store_out(out_ptr, part_out_ptr, out, b, head, row, cols, row_valid, stride_ot,
               stride_oh, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr):
    """Columns `cols` of the program's rows: to the output (DIRECT) or to its split's
    float32 partial."""
    mask = row_valid[:, None] & (cols[None, :] < HEAD_DIM)
    if DIRECT:
        tl.store(out_ptr + b.to(tl.int64) * stride_ot + head[:, None] * stride_oh
                 + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_out_ptr + row[:, None] * D_PAD + cols[None, :], out, mask=mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    num_splits,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (request, head): merge the split partials by their log-sum-exp weights."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    smask = offs_s < num_splits
    row0 = (b.to(tl.int64) * num_heads + h) * num_splits
    lse = tl.load(part_lse_ptr + row0 + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    w_sum = tl.sum(w, 0)
    parts = tl.load(
        part_out_ptr + (row0 + offs_s)[:, None] * D_PAD + offs_d[None, :],
        mask=smask[:, None] & (w[:, None] > 0.0),
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def default_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Split count from shapes only (graph-safe): fill about one wave of resident programs.

    No split once (request, kv head) pairs already fill half a wave (about 4 resident
    programs per SM); otherwise as many splits as keep the grid within one wave. On H100,
    a grid slightly over one wave costs ~10% (tail), so never round up.
    """
    slots = 4 * sm_count(device)
    work = max(batch * num_kv_heads, 1)
    if 2 * work > slots:
        return 1
    return max(1, min(MAX_SPLITS, slots // work))


def _decode_config(head_dim: int, dtype: torch.dtype, fp8_words: bool,
                   num_splits: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) tuned on H100 / H200 (FP8 words: H200 sweeps). An
    FP8 cache whose (request, kv head) programs fill the GPU unsplit takes two warps: at
    1,000 x 384 and 500 x 480, 226.9 and 152.7 us against 260.2 and 169.6 with four."""
    if fp8_words:
        return (64, 2, 3) if num_splits == 1 else (64, 4, 2)
    if dtype == torch.float32:
        return 32, 4, 2
    if head_dim <= 128:
        return 64, 4, 3
    return 32, 4, 2


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fp8_words: bool | None = None,
) -> torch.Tensor:
    """Decode attention: query ``[B, Hq, D]`` (token i = request i), seq_lens int32 ``[>= B]``.

    An FP8 kv_cache holds k / k_scale and v / v_scale (float32 [1] tensors; None: 1.0). Its
    values are read as 16-bit words of two codes where the head size allows (a power of two,
    >= 32; `fp8_words=False` reads them byte by byte, the slower form kept for comparison).

    kv_cache ``[2, num_blocks, block_size, Hkv, D]`` (already holding the new token), block_table
    int32 ``[>= B, max_blocks]``. Rows with ``seq_len == 0`` get zeros. No host sync, grid fixed
    by ``B`` and ``num_splits`` (default from ``B``, Hkv and the SM count): graph capturable.
    """
    batch, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert num_heads % num_kv_heads == 0
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    assert out.stride(-1) == 1 and kv_cache.stride(-1) == 1 and block_table.stride(-1) == 1
    group = num_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    d_pad = triton.next_power_of_2(head_dim)
    window = int(sliding_window) if sliding_window else 0
    kv_fp8, k_scale, v_scale = kv_scales(kv_cache, k_scale, v_scale)
    pdl = pdl_enabled(query.device)
    words = (kv_fp8 and query.dtype != torch.float32 and d_pad == head_dim and head_dim >= 32
             and (True if fp8_words is None else fp8_words))
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, query.device)
    num_splits = max(1, int(num_splits))
    cfg_n, cfg_w, cfg_s = _decode_config(head_dim, query.dtype, words, num_splits)
    direct = num_splits == 1
    if direct:
        part_out = out
        part_lse = out
    else:
        part_out = torch.empty(
            (batch, num_heads, num_splits, d_pad), dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty(
            (batch, num_heads, num_splits), dtype=torch.float32, device=query.device
        )
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        out,
        part_out,
        part_lse,
        query,
        kv_cache[0],
        kv_cache[1],
        block_table,
        seq_lens,
        k_scale,
        v_scale,
        scale * LOG2E,
        window,
        num_splits,
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
        BLOCK_N=block_n or cfg_n,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        SLIDING=window > 0,
        DIRECT=direct,
        KV_FP8=kv_fp8,
        Q_AS_FP16=kv_fp8 and query.dtype == torch.bfloat16,
        FP8_WORDS=words,
        INTERPRET=interpreting(),
        PDL=pdl,
        num_warps=num_warps or cfg_w,
        num_stages=num_stages or cfg_s,  # plain launches: see pagedllm.pdl
    )
    if not direct:
        _reduce_kernel[(batch, num_heads)](
            out,
            part_out,
            part_lse,
            num_splits,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            S_PAD=triton.next_power_of_2(num_splits),
            PDL=pdl,
            num_warps=4,
        )
    return out
