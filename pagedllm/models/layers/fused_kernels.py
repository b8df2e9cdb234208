"""Triton kernels that fuse a decoder layer's small element-wise steps on CUDA (reached
through `fused_ops`, which imports this module on first CUDA use).

Residual add + RMSNorm, SiLU-and-mul (either may hand its rows to an FP8 linear already
quantized per row, `Fp8Activation`), rotary embedding of q and k, and per-head q / k
RMSNorm followed by rotary (Qwen3) each become one kernel instead of five to fifteen small
torch ops. Every kernel rounds to the model dtype
where the torch reference in the layer modules does, so results agree with it to within
fp32 reduction order. The layer modules call these only for CUDA tensors; on CPU, and where
triton is missing, the torch code runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.pdl import pdl_enabled, pdl_trigger, pdl_wait
from pagedllm.quantization.fp8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX, Fp8Activation
from pagedllm.quantization.fp8_kernels import quantize_row

Normed = torch.Tensor | Fp8Activation  # a norm's output: model dtype, or e4m3 for FP8 linears


@triton.jit
def _rms_norm_kernel(out_ptr, res_out_ptr, x_ptr, res_ptr, w_ptr, scale_ptr, stride_x,
                     stride_r, stride_o, stride_ro, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                     FP8_OUT: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """One row. FP8_OUT: the normed row (rounded to the model dtype) quantized to e4m3
    codes with one scale (scale_ptr) instead of stored in the model dtype."""
    pdl_wait(PDL)  # PDL: see pagedllm.pdl
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * (1.0 / tl.sqrt(mean_sq + eps))).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    if FP8_OUT:  # the value the model-dtype store holds (a cast round trip would fold)
        quantize_row(out_ptr + row * stride_o, scale_ptr, row,
                     _round_to(out, dtype, dtype == tl.bfloat16), cols, mask, FP8_MAX,
                     MIN_SCALE)
    else:
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    out = _silu_mul_block(x_ptr + row * stride_x, d, cols)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=cols < d)

@triton.jit
def _silu_and_mul_fp8_kernel(out_ptr, scale_ptr, x_ptr, d, stride_x, stride_o,
                             BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                             MIN_SCALE: tl.constexpr):
    """One row: silu(gate) * up rounded to the model dtype, as e4m3 codes with one scale.
    Two passes over the row (its largest magnitude, then the codes); the second reads
    what the first brought into the cache."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, d, BLOCK):
        y = _silu_mul_block(x_row, d, c0 + tl.arange(0, BLOCK))
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for c0 in range(0, d, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        q = tl.clamp(_silu_mul_block(x_row, d, cols) / scale, -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty),
                 mask=cols < d)


@triton.jit
def _silu_mul_block(x_row, d, cols):
    """silu(gate) * up at `cols` of one row, rounded to the model dtype (0 past d), as
    float32: the values both SiLU-and-mul kernels store or quantize."""
    mask = cols < d
    gate = tl.load(x_row + cols, mask=mask, other=0.0)
    up = tl.load(x_row + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return _round_to(act.to(tl.float32) * up.to(tl.float32), gate.dtype,
                     gate.dtype == tl.bfloat16)


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 (ties to even), as fp32. Integer ops, so the compiler cannot
    fold the rounding into a fused multiply-add the way it folds a cast round trip."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)

@triton.jit
def _round_to(x, dtype, IS_BF16: tl.constexpr):
    if IS_BF16:
        return _round_bf16(x)
    return x.to(dtype).to(tl.float32)

@triton.jit
def _rotate_heads(base_ptr, w_ptr, offs_h, offs_d, num_heads, c, s, eps,
                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, IS_BF16: tl.constexpr,
                  NORM: tl.constexpr):
    """Rotate-half rotary of one token's heads, in place, rounding each product to the
    activations' dtype as torch does. NORM: each head's RMSNorm (weight w) first, rounded
    where the separate kernels round (HALF is then half the head)."""
    ptr = base_ptr + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    if NORM:
        mean_sq = (tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / HEAD_DIM
        inv = (1.0 / tl.sqrt(mean_sq + eps))[:, None]
        dmask = offs_d < HALF
        w1 = tl.load(w_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        a1 = _round_to(w1 * _round_to(a1 * inv, dtype, IS_BF16), dtype, IS_BF16)
        a2 = _round_to(w2 * _round_to(a2 * inv, dtype, IS_BF16), dtype, IS_BF16)
    o1 = _round_to(a1 * c, dtype, IS_BF16) - _round_to(a2 * s, dtype, IS_BF16)
    o2 = _round_to(a2 * c, dtype, IS_BF16) + _round_to(a1 * s, dtype, IS_BF16)
    tl.store(ptr, o1.to(dtype), mask=mask)
    tl.store(ptr + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt,
                   stride_kt, stride_cache, num_q_heads, num_k_heads, eps,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                   QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, NORM: tl.constexpr):
    """Program (token): rotary of its q and k heads (NORM: per-head RMSNorm first, weights
    qw / kw; unused otherwise)."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    dmask = offs_d < HALF
    c = tl.load(cos_ptr + pos * stride_cache + offs_d, mask=dmask, other=0.0)
    s = tl.load(sin_ptr + pos * stride_cache + offs_d, mask=dmask, other=0.0)
    # torch casts cos/sin to the activations' dtype before multiplying.
    dtype = q_ptr.dtype.element_ty
    IS_BF16: tl.constexpr = dtype == tl.bfloat16
    c = _round_to(c, dtype, IS_BF16)[None, :]
    s = _round_to(s, dtype, IS_BF16)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, qw_ptr, tl.arange(0, QH_PAD), offs_d, num_q_heads,
                  c, s, eps, HEAD_DIM, HALF, IS_BF16, NORM)
    _rotate_heads(k_ptr + t * stride_kt, kw_ptr, tl.arange(0, KH_PAD), offs_d, num_k_heads,
                  c, s, eps, HEAD_DIM, HALF, IS_BF16, NORM)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, fp8_output: bool = False
             ) -> Normed | tuple[Normed, torch.Tensor]:
    """RMSNorm over the last dim; with a residual, (norm(x + residual), x + residual).
    fp8_output: the normed rows as an `Fp8Activation` (per-row e4m3) instead."""
    shape = x.shape
    n_cols = shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n_cols), dtype=FP8_DTYPE if fp8_output else x.dtype,
                      device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device) if fp8_output \
        else None
    res_out = res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, n_cols)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty_like(x2)
    if rows:
        pdl = pdl_enabled(x.device)
        _rms_norm_kernel[(rows,)](
            out, res_out if res_out is not None else out, x2,
            res2 if res2 is not None else x2, weight, scales if fp8_output else out,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0),
            res_out.stride(0) if res_out is not None else 0, n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols), PDL=pdl,
            FP8_OUT=fp8_output, FP8_MAX=FP8_MAX, MIN_SCALE=_MIN_SCALE,
            num_warps=_row_warps(n_cols))  # plain launch: see pagedllm.pdl
    normed = (Fp8Activation(out.view(shape), scales.view(*shape[:-1], 1)) if fp8_output
              else out.view(shape))
    return normed if residual is None else (normed, res_out.view(shape))


def silu_and_mul(x: torch.Tensor, fp8_output: bool = False) -> torch.Tensor | Fp8Activation:
    """silu(x[..., :d]) * x[..., d:] for a 2-D x of shape [tokens, 2 * d]; fp8_output: as
    an `Fp8Activation` (per-row e4m3, one program per row) instead."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, d), dtype=FP8_DTYPE if fp8_output else x.dtype, device=x.device)
    if fp8_output:
        scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        if rows:
            block = min(2048, triton.next_power_of_2(d))
            _silu_and_mul_fp8_kernel[(rows,)](
                out, scales, x2, d, x2.stride(0), out.stride(0), BLOCK=block,
                FP8_MAX=FP8_MAX, MIN_SCALE=_MIN_SCALE, num_warps=8 if block >= 2048 else 4)
        return Fp8Activation(out.view(*x.shape[:-1], d), scales.view(*x.shape[:-1], 1))
    if rows:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
            out, x2, d, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], d)


def rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   cos_cache: torch.Tensor, sin_cache: torch.Tensor, head_dim: int,
                   rotary_dim: int) -> None:
    """Rotate-half rotary embedding of flat q [T, Hq * D] and k [T, Hk * D], in place
    (rows may be strided views, e.g. slices of a fused qkv output)."""
    _launch_rotary(positions, q, k, cos_cache, sin_cache, head_dim, rotary_dim)


def qk_norm_rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                           cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                           head_dim: int) -> None:
    """Per-head RMSNorm of flat q [T, Hq * D] and k [T, Hk * D] (Qwen3's q_norm / k_norm),
    then rotate-half rotary over the whole head, in place, in one launch."""
    assert head_dim % 2 == 0
    _launch_rotary(positions, q, k, cos_cache, sin_cache, head_dim, head_dim,
                   (q_weight, k_weight, eps))


def _launch_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   cos_cache: torch.Tensor, sin_cache: torch.Tensor, head_dim: int,
                   rotary_dim: int,
                   norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> None:
    """One `_rotary_kernel` launch; `norm` (q weight, k weight, eps) fuses the head norms."""
    num_tokens = q.shape[0]
    if not num_tokens:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos_cache.stride(-1) == 1 and cos_cache.stride(0) == sin_cache.stride(0)
    num_q_heads = q.shape[1] // head_dim
    num_k_heads = k.shape[1] // head_dim
    half = rotary_dim // 2
    q_weight, k_weight, eps = norm if norm is not None else (q, k, 0.0)
    _rotary_kernel[(num_tokens,)](
        q, k, q_weight, k_weight, cos_cache, sin_cache, positions, q.stride(0), k.stride(0),
        cos_cache.stride(0), num_q_heads, num_k_heads, eps, HEAD_DIM=head_dim, HALF=half,
        HALF_PAD=triton.next_power_of_2(half), QH_PAD=triton.next_power_of_2(num_q_heads),
        KH_PAD=triton.next_power_of_2(num_k_heads), NORM=norm is not None, num_warps=4)


def _row_warps(n_cols: int) -> int:
    if n_cols <= 1024:
        return 4
    if n_cols <= 4096:
        return 8
    return 16
