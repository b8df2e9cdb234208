"""The incremental block-table builder equals a table built from scratch every step."""

from __future__ import annotations

import random

import numpy as np

from pagedllm.worker.block_table import BlockTableRows


def _reference(block_lists: list[list[int]]) -> np.ndarray:
    width = max((len(b) for b in block_lists), default=0)
    table = np.zeros((len(block_lists), width), dtype=np.int32)
    for i, blocks in enumerate(block_lists):
        table[i, :len(blocks)] = blocks
    return table


def test_rows_follow_growing_and_reallocated_lists():
    rng = random.Random(0)
    rows = BlockTableRows()
    live = {f"r{i}": [rng.randrange(1000) for _ in range(rng.randint(1, 20))] for i in range(6)}
    for step in range(200):
        for rid in list(live):
            roll = rng.random()
            if roll < 0.3:
                live[rid].append(rng.randrange(1000))  # grows in place (a new block)
            elif roll < 0.33:
                live[rid] = [rng.randrange(1000) for _ in range(rng.randint(1, 5))]  # preempted
            elif roll < 0.35:
                del live[rid]  # finished
                rows.forget([rid])
                live[f"n{step}"] = [rng.randrange(1000)]
        ids = sorted(live)
        got = rows.table(ids, [live[r] for r in ids])
        assert np.array_equal(got, _reference([live[r] for r in ids]))
    assert set(rows._rows) <= set(live), "finished requests must be forgotten"


def test_empty_batch_and_long_rows():
    rows = BlockTableRows()
    assert rows.table([], []).shape == (0, 0)
    blocks = list(range(5000))
    assert np.array_equal(rows.table(["a"], [blocks])[0], np.arange(5000, dtype=np.int32))
