"""Typed torch-facing calls of the fused CPU kernels (`kernels.c`).

`get()` returns the loaded `CpuKernels` (built on first use, see `build`) or None; the layer
modules call it where their inputs qualify (`usable`: bf16 CPU tensors whose last dimension
is contiguous) and keep their torch code otherwise. Every call checks the layouts the C code
assumes and raises ValueError where they do not hold.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.cpu_kernels.build import exact_only, load_library

if TYPE_CHECKING:
    from pagedllm.attention.backends.abstract import AttentionMetadata

# Rows up to this width are reduced by torch's sum in one piece (longer ones may be split
# across threads, in another order): checked bit for bit in tests/test_cpu_kernels.py.
MAX_NORM_WIDTH = 16384

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


def usable(x: torch.Tensor) -> bool:
    """Whether x may go to the kernels: bf16 on the CPU, last dimension contiguous."""
    return x.dtype is torch.bfloat16 and x.device.type == "cpu" and x.stride(-1) == 1


class CpuKernels:
    """The kernels of one loaded library, with argument types set once."""

    def __init__(self, lib: ctypes.CDLL, fused_attention: bool = True) -> None:
        """`fused_attention` False: the decode attention is left to SDPA (the kernels then
        all reproduce torch bit for bit)."""
        self.fused_attention = fused_attention
        # The C functions themselves, arguments as kernels.c documents them: the checked
        # methods below call them, and so does a caller that guarantees the layouts by
        # construction (models/cpu_decode).
        self.raw_norm = lib.pl_add_rms_norm
        self.raw_norm.argtypes = [_P, _I, _P, _I, _P, _P, _P, _I, _I, _F, _I]
        self.raw_rope = lib.pl_rope_neox
        self.raw_rope.argtypes = [_P, _I, _P, _P, _I, _I, _I]
        self.raw_silu = lib.pl_silu_and_mul
        self.raw_silu.argtypes = [_P, _I, _P, _I, _I]
        self.raw_decode = lib.pl_paged_decode
        self.raw_decode.argtypes = [_P, _I, _P, _I, _P, _I, _P, _P, _P, _I, _P, _P, _P,
                                    _I, _I, _I, _I, _I, _F, _I]
        for fn in (self.raw_norm, self.raw_rope, self.raw_silu, self.raw_decode):
            fn.restype = None
        self.raw_int4 = lib.pl_int4_matmul
        self.raw_int4.argtypes = [_P, _I, _P, _P, _P, _P, _I, _I, _I, _I]
        self.raw_int4.restype = ctypes.c_int
        shift = lib.pl_int4_zero_shift
        shift.argtypes, shift.restype = [], _F
        # 0 where the library was built without AVX-512 (then torch's int4 kernel serves)
        self.int4_zero_shift = float(shift())
        self.has_int4 = self.int4_zero_shift > 0
        self.raw_int8 = lib.pl_int8_matmul
        self.raw_int8.argtypes = [_P, _I, _P, _P, _P, _I, _I, _I, _I]
        self.raw_int8.restype = ctypes.c_int
        # -1 without AVX512-BF16 (then torch's int8 kernel serves)
        self.has_int8 = self.raw_int8(None, 0, None, None, None, 0, 0, 16, 2) == 0
        self._sum = lib.pl_torch_order_sum
        self._sum.argtypes = [_P, _I, _I]
        self._sum.restype = _F
        self.sum_lanes = self._calibrate_sum()

    def _calibrate_sum(self) -> int | None:
        """The vector width with which torch's float sum reduces a row, found by comparing
        sums of fixed pseudo-random rows; None when no width reproduces them (then RMSNorm
        keeps torch's ops)."""
        gen = torch.Generator().manual_seed(17)
        rows = [torch.randn(n, generator=gen).pow(2) * 7 for n in (24, 77, 576, 2048, 5000)]
        for lanes in (8, 16, 4):
            if all(self._sum(r.data_ptr(), r.numel(), lanes) == float(r.sum()) for r in rows):
                return lanes
        return None

    def norm_exact(self, hidden: int) -> bool:
        """Whether add_rms_norm reproduces torch's bf16 result for rows of `hidden` values:
        its float sum order is known here, and rows stay short enough that torch reduces
        them in one piece."""
        return self.sum_lanes is not None and hidden <= MAX_NORM_WIDTH

    def add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of 2-D x (with a residual: of x + residual, returned second), rounded
        as torch's bf16 ops round."""
        rows, h = x.shape
        if (weight.dtype is not torch.bfloat16 or not weight.is_contiguous()
                or weight.numel() != h or x.stride(1) != 1):
            raise ValueError("add_rms_norm needs rows of contiguous values and a contiguous "
                             "bf16 weight of their width.")
        out = torch.empty((rows, h), dtype=torch.bfloat16)
        if residual is None:
            self.raw_norm(x.data_ptr(), x.stride(0), None, 0, weight.data_ptr(), out.data_ptr(),
                       None, rows, h, eps, self.sum_lanes)
            return out
        if residual.shape != x.shape or not usable(residual):
            raise ValueError("add_rms_norm needs a bf16 residual shaped like x.")
        res = torch.empty((rows, h), dtype=torch.bfloat16)
        self.raw_norm(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0),
                   weight.data_ptr(), out.data_ptr(), res.data_ptr(), rows, h, eps,
                   self.sum_lanes)
        return out, res

    def rope_inplace(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     head_dim: int) -> None:
        """Rotate-half rotary of every head of 2-D x [n, heads * head_dim] in place; cos and
        signed sin [n, head_dim] (any leading shape of n * head_dim values), contiguous."""
        rows, width = x.shape
        if width % head_dim or head_dim % 2 or x.stride(1) != 1 or x.dtype is not torch.bfloat16:
            raise ValueError("rope_inplace needs bf16 rows of whole heads of an even head_dim.")
        if not (cos.is_contiguous() and sin.is_contiguous()
                and cos.numel() == sin.numel() == rows * head_dim
                and cos.dtype is sin.dtype is torch.bfloat16):
            raise ValueError("rope_inplace needs contiguous bf16 cos / sin of [n, head_dim].")
        self.raw_rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), rows,
                   width // head_dim, head_dim)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x[:, :d]) * x[:, d:] of 2-D x."""
        rows, width = x.shape
        if width % 2 or x.stride(1) != 1:
            raise ValueError("silu_and_mul needs rows of an even number of contiguous values.")
        d = width // 2
        out = torch.empty((rows, d), dtype=torch.bfloat16)
        self.raw_silu(x.data_ptr(), x.stride(0), out.data_ptr(), rows, d)
        return out

    def paged_decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kv_cache: torch.Tensor, step: DecodeStep, scale: float,
                     sliding_window: int | None) -> torch.Tensor:
        """Write key / value [R, Hkv, D] to the step's slots of kv_cache [2, blocks,
        block_size, Hkv, D] (contiguous bf16), then attend query [R, Hq, D] (one token per
        row) over each row's context; returns [R, Hq, D]. Heads must be contiguous runs of
        D values with D a multiple of 16 (`decode_supported`)."""
        rows, hq, d = query.shape
        _, _, block_size, hkv, dk = kv_cache.shape
        if (rows != step.rows or dk != d or kv_cache.shape[1] < step.num_blocks
                or block_size != step.block_size or key.shape[1:] != (hkv, d)
                or value.shape[1:] != (hkv, d) or key.shape[0] < rows or value.shape[0] < rows
                or query.stride(1) != d or key.stride(1) != d or value.stride(1) != d
                or query.stride(2) != 1 or key.stride(2) != 1 or value.stride(2) != 1
                or kv_cache.dtype is not torch.bfloat16 or not kv_cache.is_contiguous()):
            raise ValueError("paged_decode got tensors of unexpected shapes or layouts.")
        out = torch.empty((rows, hq, d), dtype=torch.bfloat16)
        cache = kv_cache.data_ptr()
        self.raw_decode(query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0),
                     value.data_ptr(), value.stride(0), cache,
                     cache + kv_cache.stride(0) * 2, step.block_table, step.block_table_stride,
                     step.seq_lens, step.slots, out.data_ptr(), rows, hq, hkv, d, block_size,
                     scale, sliding_window or 0)
        return out

    def int4_matmul(self, codes: torch.Tensor, sc: torch.Tensor, zz: torch.Tensor
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """x [M, K] (bf16, rows contiguous) -> x @ W^T [M, N] bf16 for a 4-bit W in the tile
        layout of `int4_tiles` (N = 16 x tiles, the padded width). The weight's tensors are
        checked here, once; each call checks x's dtype, width and row layout only."""
        tiles = sc.shape[0]
        k = 32 * sc.shape[1] if sc.dim() == 3 else -1
        if (not self.has_int4 or sc.shape != (tiles, k // 32, 16) or zz.shape != sc.shape
                or codes.shape != (tiles, k // 32, 16, 16) or codes.dtype is not torch.uint8
                or sc.dtype is not torch.float32 or zz.dtype is not torch.float32
                or not codes.is_contiguous() or not sc.is_contiguous()
                or not zz.is_contiguous()):
            raise ValueError("int4_matmul got weight tensors of unexpected shapes or layouts.")
        n, raw = 16 * tiles, self.raw_int4
        cp, sp, zp = codes.data_ptr(), sc.data_ptr(), zz.data_ptr()
        return _rows_matmul(
            "int4_matmul", k, n, torch.bfloat16, (codes, sc, zz),
            lambda x, out: raw(x.data_ptr(), x.stride(0), cp, sp, zp, out.data_ptr(), n,
                               x.shape[0], n, k))

    def int8_matmul(self, codes: torch.Tensor, scale: torch.Tensor
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """x [M, K] (bf16, rows contiguous) -> x @ W^T [M, N] float32 for an int8 W in the
        layout of `int8_tiles` (N = 16 x tiles, the padded width); the weight's tensors are
        checked once, each call checks x."""
        tiles = scale.shape[0]
        k = 2 * codes.shape[1] if codes.dim() == 4 else -1
        if (not self.has_int8 or codes.shape != (tiles, k // 2, 16, 2)
                or codes.dtype is not torch.int8 or scale.shape != (tiles, 16)
                or scale.dtype is not torch.float32 or not codes.is_contiguous()
                or not scale.is_contiguous()):
            raise ValueError("int8_matmul got weight tensors of unexpected shapes or layouts.")
        n, raw = 16 * tiles, self.raw_int8
        cp, sp = codes.data_ptr(), scale.data_ptr()
        return _rows_matmul(
            "int8_matmul", k, n, torch.float32, (codes, scale),
            lambda x, out: raw(x.data_ptr(), x.stride(0), cp, sp, out.data_ptr(), n,
                               x.shape[0], n, k))


def _rows_matmul(name: str, k: int, n: int, out_dtype: torch.dtype,
                 weights: tuple[torch.Tensor, ...],
                 launch: Callable[[torch.Tensor, torch.Tensor], None]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [M, K] -> out [M, N] in `out_dtype` through `launch(x, out)`, x checked at each call
    (bf16, K wide, rows contiguous); `weights` stay alive with the returned callable."""

    def matmul(x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.bfloat16 or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
            raise ValueError(f"{name} takes bf16 rows of {k} contiguous values, got {x.dtype} "
                             f"{tuple(x.shape)}.")
        out = torch.empty((x.shape[0], n), dtype=out_dtype)
        if x.shape[0]:
            launch(x, out)
        return out

    matmul.weights = weights
    return matmul


def int8_tiles(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pl_int8_matmul`'s layout of an int8 W [N, K] (K even) with one scale per row:
    codes int8 [T, K / 2, 16, 2] (tile of 16 columns, input pair, column, input) and scales
    float32 [T, 16] (N padded to 16 T with zero columns)."""
    n, k = codes.shape
    if k % 2 or codes.dtype is not torch.int8 or scale.shape != (n,):
        raise ValueError(f"int8_tiles needs int8 codes [N, K] with K even and scales [N]; got "
                         f"{codes.dtype} {tuple(codes.shape)} and {tuple(scale.shape)}.")
    padded = -(-n // 16) * 16
    c = torch.zeros((padded, k), dtype=torch.int8)
    c[:n] = codes
    s = torch.zeros(padded, dtype=torch.float32)
    s[:n] = scale.float()
    tiles = c.reshape(padded // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return tiles, s.reshape(padded // 16, 16)


def int4_tiles(codes: np.ndarray, scale: torch.Tensor, zero: torch.Tensor, zero_shift: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pl_int4_matmul`'s layout of a 4-bit W [N, K] in groups of 32 inputs, w = (q - 8) *
    scale + zero: codes uint8 [N, K] (0..15) -> uint8 [T, K / 32, 16, 16] (tile of 16
    columns, group, input pair, column; low nibble the even input), and float32 [T, K / 32,
    16] scales and zero - zero_shift * scale (`CpuKernels.int4_zero_shift`) from `scale` /
    `zero` [N, K / 32] (N padded to 16 T with zero columns)."""
    n, k = codes.shape
    if k % 32 or scale.shape != (n, k // 32) or zero.shape != scale.shape:
        raise ValueError(f"int4_tiles needs codes [N, K] with K a multiple of 32 and scales "
                         f"[N, K / 32]; got {codes.shape} and {tuple(scale.shape)}.")
    groups, padded = k // 32, -(-n // 16) * 16
    c = np.zeros((padded, k), dtype=np.uint8)
    c[:n] = codes
    c = c.reshape(padded // 16, 16, groups, 16, 2)
    tiles = (c[..., 0] | (c[..., 1] << 4)).transpose(0, 2, 3, 1)
    sc = torch.zeros((padded, groups), dtype=torch.float32)
    zz = torch.zeros((padded, groups), dtype=torch.float32)
    sc[:n] = scale.float()
    zz[:n] = zero.float() - zero_shift * scale.float()

    def by_tile(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(padded // 16, 16, groups).permute(0, 2, 1).contiguous()

    return torch.from_numpy(np.ascontiguousarray(tiles)), by_tile(sc), by_tile(zz)


def decode_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `paged_decode` takes a layer of these heads: head_dim a multiple of 16 up to
    512, at most 16 query heads per KV head."""
    return (head_dim % 16 == 0 and head_dim <= 512 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= 16)


@dataclass(frozen=True)
class DecodeStep:
    """One decode step's per-row inputs to `paged_decode`, checked once for all layers:
    addresses of the block table (int32 [R, *]), the sequence lengths (int32 [R]) and the
    slots of the new tokens (int64 [R]); the tensors are kept alive with it."""

    rows: int
    num_blocks: int  # the cache size the block ids and slots were checked against
    block_size: int
    block_table: int
    block_table_stride: int
    seq_lens: int
    slots: int
    tensors: tuple[torch.Tensor, ...]

    @classmethod
    def of_step(cls, md: AttentionMetadata, kv_cache: torch.Tensor) -> DecodeStep:
        """The checked inputs of the decode-only step `md` against a
        cache shaped like `kv_cache`: built by the first layer that asks, kept in the step's
        `backend_cache` for the others."""
        key = ("cpu_kernels_decode", kv_cache.shape[1], kv_cache.shape[2])
        step = md.backend_cache.get(key)
        if step is None:
            step = md.backend_cache[key] = cls.of(md.block_table, md.seq_lens, md.slot_mapping,
                                                  md.num_reqs, kv_cache.shape[1],
                                                  kv_cache.shape[2])
        return step

    @classmethod
    def of(cls, block_table: torch.Tensor, seq_lens: torch.Tensor,
           slot_mapping: torch.Tensor, rows: int, num_blocks: int, block_size: int
           ) -> DecodeStep:
        """Checks what the C code would otherwise read or write out of bounds: dtypes and
        layouts, lengths within the block table, block ids and slots within the cache."""
        if (block_table.dtype is not torch.int32 or block_table.dim() != 2
                or block_table.stride(1) != 1 or block_table.shape[0] < rows
                or seq_lens.dtype is not torch.int32 or not seq_lens.is_contiguous()
                or slot_mapping.dtype is not torch.int64 or not slot_mapping.is_contiguous()
                or seq_lens.shape[0] < rows or slot_mapping.shape[0] < rows):
            raise ValueError("DecodeStep needs an int32 block table and sequence lengths and "
                             "int64 slots for every row.")
        if rows:
            low, high = torch.aminmax(block_table[:rows])
            bad = (int(seq_lens[:rows].max()) > block_table.shape[1] * block_size
                   or int(low) < 0 or int(high) >= num_blocks
                   or int(slot_mapping[:rows].max()) >= num_blocks * block_size)
        if rows and bad:
            raise ValueError("DecodeStep: a sequence length, block id or slot lies outside "
                             "the block table or the cache.")
        return cls(rows, num_blocks, block_size, block_table.data_ptr(), block_table.stride(0),
                   seq_lens.data_ptr(), slot_mapping.data_ptr(),
                   (block_table, seq_lens, slot_mapping))


@cache
def get() -> CpuKernels | None:
    """The process's fused CPU kernels (built or loaded once), or None."""
    lib = load_library()
    return CpuKernels(lib, fused_attention=not exact_only()) if lib is not None else None
