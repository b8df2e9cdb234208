"""A compact picture of the KV block pool for the dashboard: one letter per cell, run-length
encoded (`"u12f300c4"`: 12 in use, 300 free, 4 free but holding a cached prefix).

Large pools are grouped so that at most `max_cells` cells are sent: a cell is in use if any
of its blocks is, else cached if any is cached, else free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.engine.kv_cache_manager import BlockPool

IN_USE, FREE, CACHED = "u", "f", "c"


def block_states(pool: BlockPool) -> bytes:
    """One byte per block: u (referenced by a request), f (free), c (free, cached prefix)."""
    states = bytearray(IN_USE.encode()) * pool.num_blocks
    free, cached = ord(FREE), ord(CACHED)
    for block_id, block in list(pool.free_queue.items()):
        states[block_id] = cached if block.block_hash is not None else free
    return bytes(states)


def group_states(states: bytes, max_cells: int) -> tuple[bytes, int]:
    """Merge runs of blocks into at most `max_cells` cells; returns (cells, blocks per cell)."""
    n = len(states)
    per_cell = max(1, -(-n // max_cells))
    if per_cell == 1:
        return states, 1
    u, c = IN_USE.encode(), CACHED.encode()
    cells = bytearray()
    for i in range(0, n, per_cell):
        chunk = states[i:i + per_cell]
        cells += u if u in chunk else c if c in chunk else FREE.encode()
    return bytes(cells), per_cell


def run_length_encode(cells: bytes) -> str:
    """`b"uuuff"` -> `"u3f2"`."""
    out: list[str] = []
    i, n = 0, len(cells)
    while i < n:
        j = i + 1
        while j < n and cells[j] == cells[i]:
            j += 1
        out.append(f"{chr(cells[i])}{j - i}")
        i = j
    return "".join(out)


def run_length_decode(encoded: str) -> str:
    """Inverse of `run_length_encode` (for tests and clients)."""
    out: list[str] = []
    i = 0
    while i < len(encoded):
        letter, j = encoded[i], i + 1
        while j < len(encoded) and encoded[j].isdigit():
            j += 1
        out.append(letter * int(encoded[i + 1:j]))
        i = j
    return "".join(out)


def block_map(pool: BlockPool, max_cells: int = 4096) -> dict[str, Any]:
    """The pool as {num_blocks, blocks_per_cell, counts, map (run-length string)}."""
    states = block_states(pool)
    cells, per_cell = group_states(states, max_cells)
    return {
        "num_blocks": len(states),
        "blocks_per_cell": per_cell,
        "in_use": states.count(IN_USE.encode()),
        "cached_free": states.count(CACHED.encode()),
        "free": states.count(FREE.encode()),
        "map": run_length_encode(cells),
    }
