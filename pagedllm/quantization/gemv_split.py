"""The end of a one-row GEMV program (`fp8_gemv`, `int4_gemv`): store its outputs, with the
gated activation applied where the kernel computes gate and up together, and with K split
over programs without any launch besides the GEMV itself.

A split GEMV used to sum its partials atomically into a zeroed float32 buffer and cast it
afterwards: two more launches per linear (a memset and a cast), about 2 us each on an H200
at decode batch 1, which is ~15% of a small linear's time. Here each program of a split
stores its float32 partial to a scratch row instead, and counts itself in on its N tile's
counter; the program that arrives last sums the partials in split order (deterministic),
writes the output in the model dtype and resets the counter for the next launch. Scratch
and counters are allocated once per weight (`GemvScratch`), so replays of a CUDA graph
reuse them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _activate(gate, up, GATED: tl.constexpr):
    """silu(gate) * up for a gated projection, else gate as it is."""
    if GATED:
        return gate / (1.0 + tl.exp(-gate)) * up
    return gate


@triton.jit
def finish_gemv(gate, up, y_ptr, part_ptr, count_ptr, offs_n, n_mask, n_out, pid_n, pid_s,
                SPLIT: tl.constexpr, GATED: tl.constexpr):
    """Write this program's outputs y[offs_n] (see the module docstring). `gate` is the
    float32 result of an ungated GEMV (`up` ignored); gated, the row's outputs are
    silu(gate) * up. Partials of a split lie at part[s * width + n] (width n_out, or 2 n_out
    gated: gate then up)."""
    if SPLIT == 1:
        tl.store(y_ptr + offs_n, _activate(gate, up, GATED).to(y_ptr.dtype.element_ty),
                 mask=n_mask)
    else:
        width = 2 * n_out if GATED else n_out
        row = part_ptr + pid_s * width
        tl.store(row + offs_n, gate, mask=n_mask)
        if GATED:
            tl.store(row + n_out + offs_n, up, mask=n_mask)
        tl.debug_barrier()  # every thread's partial stored before the count (release)
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            gate_sum = tl.zeros_like(gate)
            up_sum = tl.zeros_like(gate)
            for s in tl.static_range(SPLIT):
                gate_sum += tl.load(part_ptr + s * width + offs_n, mask=n_mask, other=0.0,
                                    cache_modifier=".cg")
                if GATED:
                    up_sum += tl.load(part_ptr + s * width + n_out + offs_n, mask=n_mask,
                                      other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs_n, _activate(gate_sum, up_sum, GATED)
                     .to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")


class GemvScratch:
    """Float32 partials and per-tile arrival counters of one split GEMV configuration
    (split x width partials, `tiles` counters, zero between launches)."""

    def __init__(self, split: int, width: int, tiles: int, device: torch.device) -> None:
        self.split, self.width, self.tiles = split, width, tiles
        self.partials = torch.empty(max(split, 1) * width, dtype=torch.float32, device=device)
        self.counts = torch.zeros(tiles, dtype=torch.int32, device=device)

    def fits(self, split: int, width: int, tiles: int) -> bool:
        return split <= self.split and width <= self.width and tiles <= self.tiles

    @classmethod
    def for_launch(cls, scratch: GemvScratch | None, split: int, width: int, tiles: int,
                   device: torch.device) -> GemvScratch:
        """`scratch` when it is large enough, else a new one (tests and sweeps; a model's
        weights pass theirs, made at load for their own configuration)."""
        if scratch is not None and scratch.fits(split, width, tiles):
            return scratch
        return cls(split, width, tiles, device)


def k_ranges(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(inputs per split, a multiple of block_k; the number of splits that leaves)."""
    per_split = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    return per_split, triton.cdiv(k, per_split)


def split_buffers(scratch: GemvScratch | None, split: int, width: int, tiles: int,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, counters) for a launch of `split` programs per N tile over `width`
    outputs (`scratch` when it fits); unsplit, the output itself in both places (unused)."""
    if split == 1:
        return y, y
    scratch = GemvScratch.for_launch(scratch, split, width, tiles, y.device)
    return scratch.partials, scratch.counts


def split_for(tiles: int, k_blocks: int, num_sms: int, waves: int = 4) -> int:
    """K split that gives at least `waves` programs per SM where the N tiles alone do
    not fill one wave, never more than the K blocks."""
    if tiles >= num_sms:
        return 1
    return max(1, min(k_blocks, triton.cdiv(waves * num_sms, tiles)))


class GemvPlans:
    """One weight's one-row GEMV launches, ungated and gated: each configuration (from
    `make_config(gated)`) with its split scratch, made on first use (the warm-up before any
    CUDA-graph capture), then reused by every launch."""

    def __init__(self, out_features: int,
                 make_config: Callable[[bool], dict[str, int]]) -> None:
        self.out_features = out_features
        self.make_config = make_config
        self._plans: dict[bool, tuple[dict[str, int], GemvScratch | None]] = {}

    def get(self, gated: bool, device: torch.device
            ) -> tuple[dict[str, int], GemvScratch | None]:
        plan = self._plans.get(gated)
        if plan is None:
            cfg = self.make_config(gated)
            tiles = triton.cdiv(self.out_features // (2 if gated else 1), cfg["BLOCK_N"])
            scratch = (GemvScratch(cfg["split"], self.out_features, tiles, device)
                       if cfg["split"] > 1 else None)
            plan = self._plans[gated] = (cfg, scratch)
        return plan
