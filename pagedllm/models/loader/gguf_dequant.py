"""GGUF tensor data -> float32 (numpy): the dense fallback every format has."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize


def dequantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Stored rows (uint8 [rows, row bytes]) of a GGML type as float32 [rows, row length]."""
    if qtype == GGMLQuantizationType.F32:
        return np.array(rows.view(np.float32))
    if qtype == GGMLQuantizationType.F16:
        return rows.view(np.float16).astype(np.float32)
    arr = _gguf_dequantize(rows, qtype)
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)
