"""Small helpers shared by several modules."""

from __future__ import annotations

import re
import socket
import uuid

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


def random_uuid() -> str:
    return uuid.uuid4().hex


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
