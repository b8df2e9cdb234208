"""The n-gram proposer (prompt lookup): continue a request the way it continued before."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: np.ndarray, num_tokens: int, min_n: int, max_n: int) -> np.ndarray:
    """Up to `num_tokens` ids that followed the most recent earlier occurrence of the last
    n tokens of `tokens`, trying n from `max_n` down to `min_n`; empty if none matches.

    `tokens` is a request's prompt and output so far (1-D integer array)."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        # Windows starting at 0 .. length-n-1: each ends before the suffix's last token, so
        # at least one continuation token follows it.
        windows = sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + num_tokens]
    return tokens[:0]


class NgramProposer:
    """Proposals for a batch of requests, with the bounds of one `SpeculativeConfig`."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n or num_tokens < 1:
            raise ValueError(f"bad n-gram proposer bounds: k={num_tokens}, n={min_n}..{max_n}")
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[np.ndarray],
                limits: list[int] | None = None) -> list[list[int]]:
        """One proposal per request (possibly empty); `limits` caps each one (e.g. by the
        tokens the request may still generate)."""
        out = []
        for i, tokens in enumerate(token_ids):
            k = self.num_tokens if limits is None else min(self.num_tokens, limits[i])
            out.append(propose_ngram(tokens, k, self.min_n, self.max_n).tolist() if k > 0
                       else [])
        return out
