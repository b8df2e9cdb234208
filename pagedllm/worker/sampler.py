"""Batched sampling: greedy, temperature, top-k, top-p, min-p and per-request seeds.

All rows are processed together on the logits' device; only requests with a seed get their
own generator, so a seeded request draws the same numbers whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch

_EPS = 1e-5


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [R] float32; 0 = greedy
    top_k: torch.Tensor | None  # [R] int64; vocab size = off
    top_p: torch.Tensor | None  # [R] float32; 1 = off
    min_p: torch.Tensor | None  # [R] float32; 0 = off
    all_greedy: bool
    generators: dict[int, torch.Generator]  # row -> generator of seeded requests


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) logits outside each row's top-k and nucleus top-p set."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        # Keep the last k of the ascending order.
        kth = (vocab - top_k.clamp(1, vocab)).unsqueeze(1)
        threshold = sorted_logits.gather(1, kth)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        remove = cum <= (1 - top_p.unsqueeze(1))
        remove[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one id per row of `probs` (rows need not sum to 1).

    On the GPU: argmax(p / q) with q ~ Exp(1), a draw from p in one parallel pass. On the
    CPU, where drawing a random number per vocabulary entry costs milliseconds per row: the
    inverse CDF, one uniform number per row against the row's running sum (in float64).
    """
    if probs.is_cuda:
        q = torch.empty_like(probs)
        if len(generators) < probs.shape[0]:
            q.exponential_()
        for row, gen in generators.items():
            q[row].exponential_(generator=gen)
        return probs.div(q).argmax(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64)
    for row, gen in generators.items():
        u[row] = torch.rand(1, dtype=torch.float64, generator=gen)
    return inverse_cdf_sample(probs, u)


_CDF_BLOCK = 256


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row, the first id whose running sum of `probs` exceeds u * the row's total
    (u: [R, 1] float64 in [0, 1)). Ids of probability 0 span no interval: never drawn.

    In two levels, since a running sum over the whole vocabulary is a slow sequential pass:
    block sums pick the block of 256 ids, then a running sum inside that block picks the id.
    """
    rows, vocab = probs.shape
    num_blocks = -(-vocab // _CDF_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, num_blocks * _CDF_BLOCK - vocab))
    blocks = padded.view(rows, num_blocks, _CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum_(dim=-1)
    target = u * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=num_blocks - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_(min=0)), 0.0)
    inner_cdf = blocks[torch.arange(rows), block.squeeze(1)].cumsum(dim=-1,
                                                                   dtype=torch.float64)
    inner = torch.searchsorted(inner_cdf, target - before, right=True)
    # Summing in another order can leave the target a rounding error past the block's sum:
    # then its last id of positive probability.
    past_end = inner >= _CDF_BLOCK
    if bool(past_end.any()):
        last = torch.searchsorted(inner_cdf, inner_cdf[:, -1:].contiguous(), right=False)
        inner = torch.where(past_end, last, inner)
    return (block * _CDF_BLOCK + inner).squeeze(1)


class Sampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> tuple[
            torch.Tensor, torch.Tensor]:
        """Returns (sampled ids [R], final logprobs [R, V] of the sampling distribution)."""
        greedy, logits = self.process(logits, md)
        if md.all_greedy:
            return greedy, logits
        sampled = random_sample(logits.softmax(dim=-1), md.generators)
        return torch.where(md.temperature < _EPS, greedy, sampled), logits

    @staticmethod
    def process(logits: torch.Tensor, md: SamplingMetadata) -> tuple[
            torch.Tensor, torch.Tensor]:
        """(greedy ids [R], the logits of the sampling distribution [R, V]): temperature,
        min-p, top-k / top-p applied (greedy rows scaled by 1, so that their processed
        logprobs stay meaningful). The rejection sampler draws from the same distribution."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if md.all_greedy:
            return greedy, logits
        temp = torch.where(md.temperature < _EPS, 1.0, md.temperature).unsqueeze(1)
        logits = logits / temp
        if md.min_p is not None:
            logits = apply_min_p(logits, md.min_p)
        return greedy, apply_top_k_top_p(logits, md.top_k, md.top_p)

    def sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Sampled ids only. Plain greedy / temperature batches on CUDA take one fused
        Triton pass (Gumbel-max) instead of the torch pipeline."""
        if (logits.is_cuda and md.top_k is None and md.top_p is None and md.min_p is None
                and not md.generators and (fused := _triton_sampling()) is not None):
            return fused.sample(logits, md.temperature)
        return self(logits, md)[0]


@cache
def _triton_sampling() -> ModuleType | None:
    """The fused Triton sampler, imported on first CUDA use (a CPU engine never pays for
    importing triton); None without triton."""
    try:
        from pagedllm.worker import triton_sampling
    except ImportError:  # no triton: the torch pipeline samples everywhere
        return None
    return triton_sampling
