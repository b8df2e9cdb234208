"""Builds each step's block table from the requests' block lists, incrementally.

A running request's block list only grows between steps, so its row is kept as a numpy
array and extended by the block ids added since the last step, instead of converting the
whole Python list again every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class BlockTableRows:
    """Per-request numpy copies of live block-id lists (the lists the KV manager owns)."""

    def __init__(self) -> None:
        # request id -> (the list it mirrors, array with spare capacity, ids copied so far)
        self._rows: dict[str, tuple[list[int], np.ndarray, int]] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._rows.pop(rid, None)

    def row(self, request_id: str, block_ids: list[int]) -> np.ndarray:
        """The request's block ids as an int32 array (a view: copy before keeping it)."""
        n = len(block_ids)
        entry = self._rows.get(request_id)
        if entry is None or entry[0] is not block_ids:  # new, or reallocated (preempted)
            arr = np.empty(max(2 * n, 16), dtype=np.int32)
            arr[:n] = block_ids
            self._rows[request_id] = (block_ids, arr, n)
            return arr[:n]
        _, arr, done = entry
        if n > done:
            if n > len(arr):
                grown = np.empty(2 * n, dtype=np.int32)
                grown[:done] = arr[:done]
                arr = grown
            arr[done:n] = block_ids[done:n]
            self._rows[request_id] = (block_ids, arr, n)
        return arr[:n]

    def table(self, request_ids: Sequence[str], block_lists: Sequence[list[int]]) -> np.ndarray:
        """The [num_reqs, max_blocks] int32 block table of one step (zero padded)."""
        rows = [self.row(rid, ids) for rid, ids in zip(request_ids, block_lists)]
        table = np.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=np.int32)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
        return table
