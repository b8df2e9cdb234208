"""Logprobs on the device: the own token's logprob and rank plus the top-k, batched.

Every row of a step that needs logprobs (sampled tokens of requests with `logprobs`, prompt
positions of requests with `prompt_logprobs`) is computed in one batched pass per kind, and
everything, sampled token ids included, comes to the host in a single device-to-host copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.worker.output import LogprobsLists


def gather_logprobs(scores: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """[R, 3 + 2k] float64 per row: own token id, its rank, its score, k top ids, k top scores.

    `scores` [R, V] are logprobs (or logits); the rank counts the tokens scoring at least as
    high as the own token (1 = the most likely).
    """
    token_ids = token_ids.long().unsqueeze(1)
    own = scores.gather(1, token_ids)
    ranks = (scores >= own).sum(dim=-1, keepdim=True)
    parts = [token_ids.double(), ranks.double(), own.double()]
    if k > 0:
        top_scores, top_ids = scores.topk(k, dim=-1)
        parts += [top_ids.double(), top_scores.double()]
    return torch.cat(parts, dim=1)


def num_logprobs(value: int | None, vocab_size: int) -> int:
    """Top-k width of a request's `logprobs` / `prompt_logprobs` (-1: the whole vocabulary;
    None: only the own token, e.g. for best_of ranking)."""
    if value is None:
        return 0
    return vocab_size if value < 0 else min(value, vocab_size)


def to_scores(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """What logprobs report for these logits: log-softmax, or the logits themselves."""
    if mode.endswith("_logits"):
        return logits.float()
    return torch.log_softmax(logits.float(), dim=-1)


def unpack(block: np.ndarray, k: int, start: int = 0) -> LogprobsLists:
    """Host rows [P, 3 + 2K] from gather_logprobs (K >= k) -> LogprobsLists with k columns."""
    token_ids = np.empty((block.shape[0], 1 + k), dtype=np.int64)
    logprobs = np.empty((block.shape[0], 1 + k), dtype=np.float32)
    token_ids[:, 0] = block[:, 0]
    logprobs[:, 0] = block[:, 2]
    if k:
        big_k = (block.shape[1] - 3) // 2
        token_ids[:, 1:] = block[:, 3:3 + k]
        logprobs[:, 1:] = block[:, 3 + big_k:3 + big_k + k]
    return LogprobsLists(token_ids, logprobs, block[:, 1].astype(np.int64), start)


@dataclass
class _Part:
    packed: torch.Tensor  # [rows, 3 + 2K]
    entries: list[tuple[str, int, int, int]]  # (request id, rows, k, start)
    prompt: bool


@dataclass
class StepLogprobs:
    """The logprob tensors of one step, brought to the host together in one copy."""

    parts: list[_Part] = field(default_factory=list)

    def add(self, scores: torch.Tensor, token_ids: torch.Tensor,
            entries: list[tuple[str, int, int, int]], prompt: bool) -> None:
        """Queue rows of `scores` (their own tokens in `token_ids`); `entries` split the rows
        by request: (request id, number of rows, k, first prompt position)."""
        k = max(e[2] for e in entries)
        self.add_packed(gather_logprobs(scores, token_ids, k), entries, prompt)

    def add_packed(self, packed: torch.Tensor, entries: list[tuple[str, int, int, int]],
                   prompt: bool) -> None:
        """Queue rows already gathered by gather_logprobs (with k >= every entry's k)."""
        self.parts.append(_Part(packed, entries, prompt))

    def pack(self, sampled: torch.Tensor | None) -> torch.Tensor | None:
        """The sampled ids and every queued part as one flat device tensor (int64 ids alone
        when no logprobs are queued), for one device-to-host copy; None when empty."""
        if not self.parts:
            return sampled
        flat = [p.packed.flatten() for p in self.parts]
        if sampled is not None:
            flat.insert(0, sampled.double())
        return torch.cat(flat)

    def unpack(self, host: np.ndarray, num_sampled: int) -> tuple[
            list[int], dict[str, LogprobsLists], dict[str, LogprobsLists]]:
        """Split `pack`'s result, copied to the host: sampled ids, sample and prompt logprobs."""
        ids = host[:num_sampled].astype(np.int64).tolist()
        offset = num_sampled
        sample_lp: dict[str, LogprobsLists] = {}
        prompt_lp: dict[str, LogprobsLists] = {}
        for part in self.parts:
            rows, width = part.packed.shape
            block = host[offset:offset + rows * width].reshape(rows, width)
            offset += rows * width
            row = 0
            target = prompt_lp if part.prompt else sample_lp
            for rid, n, k, start in part.entries:
                target[rid] = unpack(block[row:row + n], k, start)
                row += n
        return ids, sample_lp, prompt_lp
