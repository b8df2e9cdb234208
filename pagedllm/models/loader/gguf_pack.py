"""GGUF quantized blocks -> the layouts of torch's CPU low-bit matmul kernels.

Two packed forms (``pagedllm.models.layers.quantized.PackedWeight`` runs them):

* **int4, group 32** (``torch.ops.aten._weight_int4pack_mm_for_cpu``): 4-bit codes q in
  [0, 16) with one (scale, zero) pair per 32 weights of a row, w = (q - 8) * scale + zero.
  Q4_0 (w = d (q - 8)), Q4_1 (w = d q + m) and Q4_K (w = d sc q - dmin m per 32-weight
  sub-block) are this form exactly; only the scales are rounded to the activation dtype.
* **int8, one scale per row** (``torch._weight_int8pack_mm``): Q8_0, Q5_K and Q6_K are
  dequantized and requantized symmetrically per output row (an extra rounding of at most
  half a step of max|row| / 127).

Other types (F32 / F16 / BF16, Q5_0, Q5_1, Q2_K, Q3_K) have no packed form here: their
layers are dequantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from pagedllm.models.loader.gguf_dequant import dequantize_rows

Q = GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
INT8_TYPES = (Q.Q8_0, Q.Q5_K, Q.Q6_K)
GROUP = 32


@dataclass
class Int4Rows:
    """Rows in the int4 form: codes uint8 [N, K] (0..15), scale / zero float32 [N, K / 32]."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray


@dataclass
class Int8Rows:
    """Rows in the int8 form: int8 [N, K] and one float32 scale per row [N]."""

    codes: np.ndarray
    scale: np.ndarray


def packed_kind(qtype: GGMLQuantizationType) -> str | None:
    """'int4', 'int8' or None (dequantized) for a GGML type."""
    if qtype in INT4_TYPES:
        return "int4"
    if qtype in INT8_TYPES:
        return "int8"
    return None


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 bytes [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32 weights -> 32 codes: byte i holds weight i (low) and i + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> Int4Rows:
    """Q4_0 / Q4_1 / Q4_K rows (uint8 [N, row bytes]) in the int4 form."""
    n = rows.shape[0]
    if qtype in (Q.Q4_0, Q.Q4_1):
        size = 18 if qtype == Q.Q4_0 else 20
        blocks = rows.reshape(n, -1, size)
        d = _f16(blocks[..., 0:2])
        codes = _nibbles32(blocks[..., size - 16:])
        if qtype == Q.Q4_0:
            zero = np.zeros_like(d)
        else:  # d q + m = d (q - 8) + (m + 8 d)
            zero = _f16(blocks[..., 2:4]) + 8.0 * d
        return Int4Rows(codes.reshape(n, -1), d, zero)
    if qtype != Q.Q4_K:
        raise ValueError(f"{qtype.name} has no int4 form")
    blocks = rows.reshape(n, -1, 144)  # 256 weights: d, dmin, 12 scale bytes, 128 code bytes
    nb = blocks.shape[1]
    d = _f16(blocks[..., 0:2])[..., None]
    dmin = _f16(blocks[..., 2:4])[..., None]
    sb = blocks[..., 4:16].astype(np.uint8)
    # Eight 6-bit (scale, min) pairs: the first four in the low bits of bytes 0-3 / 4-7,
    # the last four in bytes 8-11's nibbles with their top two bits in bytes 0-7's top bits.
    sc = np.empty((n, nb, 8), dtype=np.float32)
    mn = np.empty((n, nb, 8), dtype=np.float32)
    sc[..., :4] = sb[..., 0:4] & 63
    mn[..., :4] = sb[..., 4:8] & 63
    sc[..., 4:] = (sb[..., 8:12] & 0x0F) | ((sb[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (sb[..., 8:12] >> 4) | ((sb[..., 4:8] >> 6) << 4)
    qs = blocks[..., 16:].reshape(n, nb, 4, 32)  # four 64-weight chunks
    # chunk c: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1)
    scale = (d * sc).reshape(n, -1)
    zero = (8.0 * d * sc - dmin * mn).reshape(n, -1)  # d sc q - dmin m = d sc (q - 8) + ...
    return Int4Rows(codes, scale, zero)


def int8_rows(dense: np.ndarray) -> Int8Rows:
    """Float rows [N, K] requantized to int8 with one symmetric scale per row."""
    amax = np.abs(dense).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(dense / scale[:, None]), -127, 127).astype(np.int8)
    return Int8Rows(codes, scale)


def dequantize_int4(packed: Int4Rows) -> np.ndarray:
    """The float32 weights an Int4Rows stands for (tests and the dense fallback)."""
    n = packed.codes.shape[0]
    q = packed.codes.reshape(n, -1, GROUP).astype(np.float32) - 8.0
    return (q * packed.scale[..., None] + packed.zero[..., None]).reshape(n, -1)


def rows_for(rows: np.ndarray, qtype: GGMLQuantizationType, kind: str) -> Int4Rows | Int8Rows:
    """Stored rows of `qtype` in packed form `kind` ('int4' needs an int4 type; 'int8'
    takes any type, requantized)."""
    if kind == "int4":
        return int4_rows(rows, qtype)
    return int8_rows(dequantize_rows(rows, qtype))
