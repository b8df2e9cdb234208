"""Triton kernel that scatters new key/value tokens into the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_blk,
    stride_c_slot,
    stride_c_h,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    FP8: tl.constexpr,
):
    """One program per token: copy its [Hkv, D] key and value rows into their cache slot
    (FP8: divided by the per-tensor scales, saturated to +-448)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < num_kv_heads) & (d < HEAD_DIM) & ((h * 0 + slot) >= 0)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + blk * stride_c_blk + off * stride_c_slot + h * stride_c_h + d
    if FP8:
        k = tl.clamp(k.to(tl.float32) / tl.load(k_scale_ptr), -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / tl.load(v_scale_ptr), -448.0, 448.0)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value ``[T, Hkv, D]`` into ``kv_cache[0]``/``kv_cache[1]`` at ``slot_mapping``.

    An FP8 (e4m3) cache stores key / k_scale and value / v_scale (float32 [1] tensors; None:
    1.0), rounded to nearest and saturated.

    ``kv_cache`` is ``[2, num_blocks, block_size, Hkv, D]``; ``slot_mapping`` (int64, length
    ``T' <= T``) gives ``block * block_size + offset`` per token, ``-1`` for padding (skipped).
    Only the first ``T'`` tokens of key/value are read.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    assert num_tokens <= key.shape[0] and num_tokens <= value.shape[0]
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert kv_cache.stride(-1) == 1, "kv_cache must be contiguous in head_dim"
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        ones = torch.ones(1, dtype=torch.float32, device=kv_cache.device)
        k_scale = ones if k_scale is None else k_scale
        v_scale = ones if v_scale is None else v_scale
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        k_scale if fp8 else slot_mapping,
        v_scale if fp8 else slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        H_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim),
        FP8=fp8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
