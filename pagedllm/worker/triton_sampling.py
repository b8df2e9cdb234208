"""Greedy and temperature sampling in one Triton pass over the logits (CUDA).

argmax(logits / T + G) with G ~ Gumbel(0, 1) drawn per element is an exact draw from
softmax(logits / T), so a row needs one read of its logits and no softmax, division or
normalisation pass; greedy rows (T = 0) take the plain argmax. Ties go to the lowest token
id, as torch.argmax does. The noise of a logit depends on its row and id only, so
splitting a row's vocabulary over programs (small batches) draws the same token. Requests
with top-k / top-p / min-p or their own seed use the torch sampler instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.utils import sm_count


@triton.jit(do_not_specialize=["stride_row", "seed", "chunk"])  # one variant for all steps
def _gumbel_argmax_kernel(out_ptr, part_val_ptr, part_idx_ptr, logits_ptr, temperature_ptr,
                          stride_row, vocab, seed, chunk, BLOCK: tl.constexpr,
                          SPLIT: tl.constexpr):
    """Program (row, vocabulary chunk): the best Gumbel-perturbed logit of its chunk, into
    out (SPLIT 1) or the partials of `_merge_kernel`."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature < 1e-5
    scale = tl.where(greedy, 1.0, 1.0 / tl.maximum(temperature, 1e-5))
    noise = tl.where(greedy, 0.0, 1.0)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lo = part * chunk
    hi = tl.minimum(lo + chunk, vocab)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hi
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed + row, offs)  # the same draw whatever the chunking
        u = tl.minimum(tl.maximum(u, 1e-10), 1.0 - 1e-7)
        gumbel = -tl.log(-tl.log(u))
        val = x * scale + gumbel * noise
        val = tl.where(mask, val, float("-inf"))
        better = val > best
        best = tl.where(better, val, best)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best, axis=0)
    # Lowest id among the lanes holding the maximum (all -inf: id 0, as torch.argmax).
    idx = tl.min(tl.where(best == top, best_idx, vocab), axis=0)
    if SPLIT == 1:
        tl.store(out_ptr + row, idx.to(tl.int64))
    else:
        tl.store(part_val_ptr + row * SPLIT + part, top)
        tl.store(part_idx_ptr + row * SPLIT + part, idx)


@triton.jit
def _merge_kernel(out_ptr, part_val_ptr, part_idx_ptr, SPLIT: tl.constexpr):
    """Program (row): the best of its chunks' winners, the lowest id on ties."""
    row = tl.program_id(0)
    offs = tl.arange(0, SPLIT)
    val = tl.load(part_val_ptr + row * SPLIT + offs)
    idx = tl.load(part_idx_ptr + row * SPLIT + offs)
    top = tl.max(val, axis=0)
    best = tl.min(tl.where(val == top, idx, 2**31 - 1), axis=0)
    tl.store(out_ptr + row, best.to(tl.int64))


_BLOCK = 2048
_MAX_SPLIT = 64


def vocab_split(rows: int, vocab: int, num_sms: int) -> int:
    """Chunks per row (a power of two): one for batches that fill the GPU by rows, else
    enough to give every SM about two programs (a batch-1 row of 128k logits took ~95 us
    in one program on an H200), never chunks under one block."""
    split = 1
    while (split < _MAX_SPLIT and rows * split < 2 * num_sms
           and vocab >= 2 * split * _BLOCK):
        split *= 2
    return split


def sample(logits: torch.Tensor, temperature: torch.Tensor,
           generator: torch.Generator | None = None, split: int | None = None) -> torch.Tensor:
    """One token id per row of logits [R, V] (any float dtype, CUDA); temperature [R] float32,
    0 for greedy rows. The Gumbel noise is seeded from torch's CPU generator (no device
    sync). Few rows split the vocabulary over programs (`split` chunks per row, a power of
    two; default `vocab_split`), merged by a second launch."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    seed = int(torch.randint(0, 2**31 - 1 - rows, (1,), generator=generator).item())
    if split is None:
        split = vocab_split(rows, vocab, sm_count(logits.device))
    if split < 1 or split & (split - 1):
        raise ValueError(f"split must be a power of two, got {split}.")
    chunk = triton.cdiv(triton.cdiv(vocab, split), _BLOCK) * _BLOCK
    part_val = part_idx = out  # unused by one chunk per row
    if split > 1:
        part_val = torch.empty(rows * split, dtype=torch.float32, device=logits.device)
        part_idx = torch.empty(rows * split, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(rows, split)](out, part_val, part_idx, logits, temperature,
                                         logits.stride(0), vocab, seed, chunk, BLOCK=_BLOCK,
                                         SPLIT=split, num_warps=8)
    if split > 1:
        _merge_kernel[(rows,)](out, part_val, part_idx, SPLIT=split, num_warps=1)
    return out
