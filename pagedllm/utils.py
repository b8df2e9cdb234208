"""Small helpers shared by several modules."""

from __future__ import annotations

import contextlib
import gc
import json
import re
import socket
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """Parse '4GiB', '512MB', '1000000' into a byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"Cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 1000000.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def freeze_startup_heap() -> int:
    """Collect, then take every object alive now out of the garbage collector's view
    (`gc.freeze`), for a server process once it has started: its start-up heap (model,
    tokenizer, app: ~350k objects) is never scanned again, so a full collection while
    serving no longer stalls every stream for a pass over that heap (0.35 s each on the
    2-core CPU). Not for the offline `LLM`, whose caller's objects would be frozen too.
    Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


HELD_FULL_COLLECTIONS = 1 << 30  # gen-2 threshold while steady_gc holds full collections


@contextlib.contextmanager
def steady_gc() -> Iterator[None]:
    """For an offline run's step loop: the objects alive on entry leave the garbage
    collector's view (`gc.freeze`) and automatic full collections wait until the block ends
    (young collections go on; cycles that outlive them are collected afterwards). A full
    collection there scans the heap (torch, the model, the caller's objects): on an H200 host
    each took ~0.3 s with the device idle, 6-10 times per 1,000-request run. Thresholds come
    back on exit, and the freeze is undone unless the caller had frozen objects already
    (then what was alive on entry stays frozen with them)."""
    thresholds = gc.get_threshold()
    undo_freeze = gc.get_freeze_count() == 0
    gc.freeze()
    gc.set_threshold(thresholds[0], thresholds[1], HELD_FULL_COLLECTIONS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if undo_freeze:
            gc.unfreeze()


def random_uuid() -> str:
    return uuid.uuid4().hex


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_dict(value: Any, name: str, flag: str, example: str,
                known: Iterable[str]) -> dict[str, Any]:
    """A config argument given as a dict (Python) or its JSON text (the CLI `flag`), with
    only `known` keys; anything else is a ValueError naming `name` and showing `example`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} must be a JSON object such as {example}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict such as {example} "
                         f"(got {type(value).__name__}).")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"{name} has unsupported keys {unknown} (unknown keys are "
                         f"refused); pagedllm takes {sorted(known)}.")
    return dict(value)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (kernel grid sizing); 132, an H100's /
    H200's count, elsewhere (the Triton interpreter on the CPU)."""
    if device.type != "cuda":
        return 132
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def to_device_async(values: Any, device: torch.device) -> torch.Tensor:
    """A host array (numpy or a CPU tensor) on `device` without waiting for the device.

    A copy from pageable memory may wait for the work already queued on the stream (the
    driver stages it through its own pinned buffer), so the host could not prepare the next
    step while the device runs this one. On CUDA the values are staged in pinned memory
    from torch's caching host allocator, which keeps that block until the copy is done."""
    import numpy as np
    import torch

    host = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
    if device.type != "cuda":
        return host.to(device)
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)
