"""CPU memory that becomes resident only where it is written."""

from __future__ import annotations

import math
import mmap

import torch


def zeros_untouched(shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero tensor on anonymous memory that the kernel maps in page by page as it is
    written (torch.zeros writes every page up front): a KV cache costs resident memory
    only for the blocks the engine has used."""
    del device  # CPU only
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype).view(shape)
