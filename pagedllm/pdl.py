"""Programmatic dependent launch (PDL) for the decode step's small Triton kernels on
Hopper and later GPUs.

At batch 1 a decode step is a chain of ~10 short kernels per layer, and each one starts
only after the one before it has drained: its launch, the scheduling of its programs and
their first loads are all exposed. A kernel launched with PDL (`launch_options`) may be
scheduled while the kernel before it still runs, once every program of that kernel has
called `pdl_trigger` (or exited). It then blocks in `pdl_wait` until that kernel has
completed and its writes are visible, so a PDL kernel calls `pdl_wait` before its first
global memory access, and calls `pdl_trigger` next so that its own successor can be
scheduled early. `pdl_wait` is a no-op in a kernel launched without PDL.

Only the one-row GEMVs (FP8, 4-bit, the one-token MoE path) are launched with PDL. The
kernels that run before them (residual add + RMSNorm, decode attention and its split
merge) call `pdl_trigger` but are launched plainly: launched with PDL after cuBLAS's GEMMs
they made the bf16 decode step ~2% slower on an H200 (4.82 against 4.72 ms per token at
batch 1). The GEMVs' PDL launches took the FP8 step from 2.88 to 2.81 ms.

Enabled on CUDA devices of compute capability 9.0 and later with a Triton that has grid
dependency control; PAGEDLLM_PDL=0 turns it off (for measuring against it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # Triton before 3.4
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the kernel before this one in the stream has completed (PDL only)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel in the stream be scheduled now (PDL only)."""
    if PDL:
        gdc_launch_dependents()


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (see the module docstring)."""
    if not _HAS_GDC or device.type != "cuda" or os.environ.get("PAGEDLLM_PDL") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool) -> dict[str, bool]:
    """Extra launch keywords of a kernel that takes part in PDL."""
    return {"launch_pdl": True} if pdl else {}
