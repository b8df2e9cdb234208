"""Greedy and temperature sampling in one Triton pass over the logits (CUDA).

argmax(logits / T + G) with G ~ Gumbel(0, 1) drawn per element is an exact draw from
softmax(logits / T), so a row needs one read of its logits and no softmax, division or
normalisation pass; greedy rows (T = 0) take the plain argmax. Ties go to the lowest token
id, as torch.argmax does. Requests with top-k / top-p / min-p or their own seed use the
torch sampler instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_row", "seed"])  # one compiled variant for all steps
def _gumbel_argmax_kernel(out_ptr, logits_ptr, temperature_ptr, stride_row, vocab, seed,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature < 1e-5
    scale = tl.where(greedy, 1.0, 1.0 / tl.maximum(temperature, 1e-5))
    noise = tl.where(greedy, 0.0, 1.0)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed + row, offs)
        u = tl.minimum(tl.maximum(u, 1e-10), 1.0 - 1e-7)
        gumbel = -tl.log(-tl.log(u))
        val = x * scale + gumbel * noise
        val = tl.where(mask, val, float("-inf"))
        better = val > best
        best = tl.where(better, val, best)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best, axis=0)
    # Lowest id among the lanes holding the maximum (a row of all -inf gives id 0).
    idx = tl.min(tl.where(best == top, best_idx, vocab), axis=0)
    idx = tl.where(idx == vocab, 0, idx)
    tl.store(out_ptr + row, idx.to(tl.int64))


def sample(logits: torch.Tensor, temperature: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits [R, V] (any float dtype, CUDA); temperature [R] float32,
    0 for greedy rows. The Gumbel noise is seeded from torch's CPU generator (no device sync)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    seed = int(torch.randint(0, 2**31 - 1 - rows, (1,), generator=generator).item())
    _gumbel_argmax_kernel[(rows,)](out, logits, temperature, logits.stride(0), vocab, seed,
                                   BLOCK=2048, num_warps=8)
    return out
