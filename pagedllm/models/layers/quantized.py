"""Packed low-bit weights on the CPU (GGUF checkpoints kept quantized).

A `PackedWeight` replaces a linear layer's dense weight: the layer's forward calls it
instead of ``F.linear`` (bias, tensor-parallel reduce and gather stay the layer's). It runs
torch's CPU kernels, which take bf16 (or fp32, much slower) activations:

* ``int4``: ``_weight_int4pack_mm_for_cpu`` with one (scale, zero) per 32 weights;
* ``int8``: ``_weight_int8pack_mm`` with one scale per output row;
* ``int4t``: the int4 weights in pagedllm's own tile layout for ``cpu_kernels``'
  ``pl_int4_matmul`` (bf16 activations, group 32, a build with AVX-512): each weight tile is
  unpacked once for up to 8 rows, where torch's kernel unpacks it again for every row
  (2x faster at 8 rows, 1.2-1.4x at one on an AMD EPYC; benchmarks/RESULTS.md). `int4`
  picks it wherever the kernels are there, except with ``PAGEDLLM_CPU_KERNELS=exact``.

Measured on the 2-core AVX512-BF16 machine (benchmarks/RESULTS.md, 2026-12-02): with bf16
activations both run a [1, 576] x [576, 3072] product in about 70 us (dense bf16 150 us,
fp32 145 us); with fp32 activations they fall back to a path 25x slower, and
``_dyn_quant_matmul_4bit`` (KleidiAI on Arm) is that slow reference path on x86.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from pagedllm.cpu_kernels.ops import CpuKernels

PACKED_KINDS = ("int4", "int4t", "int8")
BASE_KIND = {"int4": "int4", "int4t": "int4", "int8": "int8"}  # the GGUF rows they hold


class PackedWeight(nn.Module):
    """y = x W^T for a packed W [out_features, in_features]; x in `dtype` (bf16 or fp32)."""

    def __init__(self, kind: str, out_features: int, in_features: int, dtype: torch.dtype,
                 codes: torch.Tensor, scales: torch.Tensor, group_size: int = 32) -> None:
        super().__init__()
        if kind not in PACKED_KINDS:
            raise ValueError(f"Unknown packed weight kind {kind!r}; use one of {PACKED_KINDS}.")
        self.kind = kind
        self.out_features = out_features
        self.in_features = in_features
        self.dtype = dtype
        self.group_size = group_size
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        # int4t: the CPU kernel's matmul on these tensors (x [M, K] -> [M, padded N])
        self.tile_matmul = None
        if kind == "int4t":
            kernels = _cpu_kernels()
            if kernels is None or not kernels.has_int4:
                raise ValueError("int4t packed weights need the CPU kernels' int4 matmul "
                                 "(a C compiler, AVX-512, PAGEDLLM_CPU_KERNELS not 0).")
            self.tile_matmul = kernels.int4_matmul(codes, scales[0], scales[1])

    @classmethod
    def int4(cls, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
             dtype: torch.dtype, group_size: int = 32) -> PackedWeight:
        """From 4-bit codes uint8 [N, K] and per-group scale / zero float32 [N, K / group]:
        w = (q - 8) * scale + zero."""
        n, k = codes.shape
        kernels = _tile_kernels(dtype, group_size)
        if kernels is not None:  # scale and zero rounded to dtype, as torch's kernel takes them
            from pagedllm.cpu_kernels.ops import int4_tiles

            tiles, sc, zz = int4_tiles(codes, torch.from_numpy(scale).to(dtype),
                                       torch.from_numpy(zero).to(dtype), kernels.int4_zero_shift)
            return cls("int4t", n, k, dtype, tiles, torch.stack([sc, zz]), group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(codes.astype(np.int32)), 1)
        sz = torch.from_numpy(np.stack([scale.T, zero.T], axis=-1)).to(dtype).contiguous()
        return cls("int4", n, k, dtype, packed, sz, group_size)

    @classmethod
    def int8(cls, codes: np.ndarray, scale: np.ndarray, dtype: torch.dtype) -> PackedWeight:
        """From int8 codes [N, K] and one float32 scale per row [N]: w = q * scale."""
        n, k = codes.shape
        return cls("int8", n, k, dtype, torch.from_numpy(np.ascontiguousarray(codes)),
                   torch.from_numpy(scale).to(dtype), 0)

    @property
    def nbytes(self) -> int:
        return (self.codes.numel() * self.codes.element_size()
                + self.scales.numel() * self.scales.element_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if self.kind == "int4t":
            y = self.tile_matmul(x2)
            if y.shape[1] != self.out_features:  # tiles of 16 columns, padded
                y = y[:, :self.out_features].contiguous()
        elif self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.codes, self.group_size,
                                                            self.scales)
        else:
            y = torch._weight_int8pack_mm(x2, self.codes, self.scales)
        return y.view(*lead, self.out_features)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (int8 only): a quantized embedding lookup."""
        if self.kind != "int8":
            raise ValueError("Only int8 packed weights serve embedding lookups.")
        rows = torch.nn.functional.embedding(ids, self.codes).to(self.dtype)
        return rows * self.scales[ids].unsqueeze(-1)

    def dequantized(self) -> torch.Tensor:
        """W as a dense tensor in `dtype` (tests and debugging)."""
        if self.kind == "int8":
            return self.codes.to(self.dtype) * self.scales.unsqueeze(-1)
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return self.forward(eye).t().contiguous()

    def extra_repr(self) -> str:
        return f"{self.kind}, out={self.out_features}, in={self.in_features}, {self.dtype}"


def _cpu_kernels() -> CpuKernels | None:
    from pagedllm.cpu_kernels import ops

    return ops.get()


def tile_kernels() -> CpuKernels | None:
    """The loaded CPU kernels for weights in their tile layouts (int4 matmul, int8 LM head),
    or None: none built, or ``PAGEDLLM_CPU_KERNELS=exact`` (torch's kernels, bit for bit)."""
    from pagedllm.cpu_kernels.build import exact_only

    return None if exact_only() else _cpu_kernels()


def _tile_kernels(dtype: torch.dtype, group_size: int) -> CpuKernels | None:
    """The loaded CPU kernels where they serve an int4 weight in tiles, else None."""
    if dtype is not torch.bfloat16 or group_size != 32:
        return None
    kernels = tile_kernels()
    return kernels if kernels is not None and kernels.has_int4 else None


def int4_layout_tag() -> str:
    """Which int4 layout `PackedWeight.int4` makes in this process (pack cache keys)."""
    kernels = _tile_kernels(torch.bfloat16, 32)
    return f"tiles{kernels.int4_zero_shift:g}" if kernels is not None else "torch"


def attach_packed(module: nn.Module, packed: PackedWeight) -> None:
    """Give a linear / embedding layer a packed weight in place of its dense `weight`.

    A plain attribute (not a submodule), so the forward's `self.packed` check stays a dict
    lookup; the dense parameter is dropped (its memory was never touched: torch.empty)."""
    module.register_parameter("weight", None)
    object.__setattr__(module, "packed", packed)
