"""Host side of logprobs: runner arrays -> vLLM's list[dict[token_id, Logprob]] shape."""

from __future__ import annotations

from typing import Any

from pagedllm.outputs import Logprob
from pagedllm.worker.output import LogprobsLists


class TokenTexts:
    """Decoded text of single tokens for Logprob.decoded_token, cached per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def logprob_dicts(lists: LogprobsLists, num: int, decode: TokenTexts | None
                  ) -> list[dict[int, Logprob]]:
    """One dict per row: the row's own token first, then its `num` most likely alternatives
    (num + 1 entries, or num when the own token is among them; num -1: every column).
    Ranks are 1-based."""
    out = []
    ids = lists.token_ids.tolist()
    lps = lists.logprobs.tolist()
    ranks = lists.ranks.tolist()
    width = lists.token_ids.shape[1] - 1
    count = width if num < 0 else min(num, width)
    for row_ids, row_lps, rank in zip(ids, lps, ranks):
        own = row_ids[0]
        entry = {own: Logprob(row_lps[0], rank, decode(own) if decode else None)}
        for j in range(1, count + 1):
            tid = row_ids[j]
            if tid not in entry:
                entry[tid] = Logprob(row_lps[j], j, decode(tid) if decode else None)
        out.append(entry)
    return out
