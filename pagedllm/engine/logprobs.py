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


class TokenBytes:
    """The raw UTF-8 bytes of single tokens (OpenAI's `bytes`), right even for tokens that
    hold part of a character: byte-level BPE tokens are mapped back through the GPT-2 byte
    alphabet, `<0xNN>` byte-fallback tokens give their byte, others their decoded text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._unicode_to_byte = {c: b for b, c in _byte_alphabet().items()}

    def __call__(self, token_id: int) -> bytes:
        raw = self._cache.get(token_id)
        if raw is None:
            raw = self._bytes(token_id)
            self._cache[token_id] = raw
        return raw

    def _bytes(self, token_id: int) -> bytes:
        text = self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_level and all(c in self._unicode_to_byte for c in piece):
            return bytes(self._unicode_to_byte[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return text.encode("utf-8")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies:
    printable Latin-1 bytes stand for themselves, the rest are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1),
                 *range(0xAE, 0xFF + 1)]
    out = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + shift)
            shift += 1
    return out


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
