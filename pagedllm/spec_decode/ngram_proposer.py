"""The n-gram proposer (prompt lookup): continue a request the way it continued before.

Each step looks, in the request's own tokens, for the most recent earlier occurrence of its
last n tokens. The search starts from the places where the last token occurred (one
vectorized comparison over the tokens), then extends those candidates backwards, so a step
costs one pass over an int32 array rather than a window comparison per n; the array is kept
per request and only grows by the tokens appended since the last step.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(tokens: np.ndarray, num_tokens: int, min_n: int, max_n: int) -> np.ndarray:
    """Up to `num_tokens` ids that followed the most recent earlier occurrence of the last
    n tokens of `tokens`, trying n from `max_n` down to `min_n`; empty if none matches.

    `tokens` is a request's prompt and output so far (1-D integer array)."""
    length = len(tokens)
    max_n = min(max_n, length - 1)
    if max_n < min_n:
        return tokens[:0]
    # Candidate ends: earlier positions holding the last token, each with at least one
    # continuation token after it.
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])
    if not len(ends):
        return tokens[:0]
    # How far back each candidate agrees with the suffix, up to max_n tokens.
    matched = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for j in range(1, max_n):
        back = ends - j
        ok = alive & (back >= 0)
        ok[ok] = tokens[back[ok]] == tokens[length - 1 - j]
        alive = ok
        if not alive.any():
            break
        matched += alive
    for n in range(max_n, min_n - 1, -1):
        hits = np.flatnonzero(matched >= n)
        if len(hits):
            start = int(ends[hits[-1]]) + 1
            return tokens[start:start + num_tokens]
    return tokens[:0]


class _TokenBuffer:
    """A request's tokens as a growing int32 array (capacity doubles)."""

    def __init__(self) -> None:
        self.data = np.empty(0, dtype=np.int32)
        self.length = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        """Append what `tokens` gained since the last call; rebuild if it changed."""
        n = len(tokens)
        if n < self.length or (self.length and tokens[self.length - 1] !=
                               self.data[self.length - 1]):
            self.length = 0
        if n > len(self.data):
            grown = np.empty(max(n, 2 * len(self.data), 64), dtype=np.int32)
            grown[:self.length] = self.data[:self.length]
            self.data = grown
        if n > self.length:
            self.data[self.length:n] = tokens[self.length:n]
            self.length = n
        return self.data[:n]


class NgramProposer:
    """Proposals for one engine's requests, with the bounds of one `SpeculativeConfig`; it
    keeps each request's tokens as an array until `forget`."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n or num_tokens < 1:
            raise ValueError(f"bad n-gram proposer bounds: k={num_tokens}, n={min_n}..{max_n}")
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, request_id: str, tokens: list[int], limit: int) -> list[int]:
        """Up to min(K, limit) draft tokens for the request whose tokens so far (prompt and
        output) are `tokens`; possibly none."""
        k = min(self.num_tokens, limit)
        if k <= 0:
            return []
        buffer = self._buffers.get(request_id)
        if buffer is None:
            buffer = self._buffers[request_id] = _TokenBuffer()
        return propose_ngram(buffer.sync(tokens), k, self.min_n, self.max_n).tolist()

    def forget(self, request_id: str) -> None:
        """Drop a finished request's tokens."""
        self._buffers.pop(request_id, None)
