"""The grammar bitmask of a step: filled on the host, applied to the logits on the device.

Row r of the int32 bitmask covers logits row r: bit j of word w allows token 32 * w + j.
Both backends write this layout, so one buffer serves a batch that mixes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedllm.structured_output.config import backend_available
from pagedllm.utils import to_device_async


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: Sequence[int] | None = None) -> None:
    """Set disallowed logits to -inf in place, for ``rows`` (all rows when None).

    ``bitmask`` lives on ``logits``' device; row r masks logits row r. Uses xgrammar's kernels
    where it is installed (native on the CPU, Triton on CUDA), else a plain torch unpack
    (llguidance's own apply goes through torch.compile: ~30 s on its first CPU call).
    """
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    index: torch.Tensor | None = None
    if rows is not None:
        rows = list(rows)
        if not rows:
            return
        index = _device_index(rows, logits.device)
    if backend_available("xgrammar"):
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=index)
    else:
        _apply_torch(logits, bitmask, vocab, index)
    if logits.shape[-1] > vocab:  # ids past the bitmask are never allowed
        logits[index if index is not None else slice(None), vocab:] = float("-inf")


def _device_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """``rows`` as an int32 tensor on ``device``, copied without waiting for the device.

    ``torch.tensor(rows, device=...)`` copies synchronously, which waits for the step's
    forward to finish (the torch unpack did so; so does xgrammar's native CUDA kernel when
    given a list): the host could then not launch the sampler ahead of the device."""
    return to_device_async(torch.tensor(rows, dtype=torch.int32), device)


def _apply_torch(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int,
                 rows: torch.Tensor | None) -> None:
    index = slice(None) if rows is None else rows.long()
    words = bitmask[index]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(-2)[:, :vocab].bool()
    view = logits[index, :vocab]
    logits[index, :vocab] = view.masked_fill(~allowed, float("-inf"))


class GrammarBitmask:
    """A pinned host bitmask for up to ``max_rows`` logits rows and its device copy.

    ``host`` is filled between launching a step's forward and sampling it; ``apply`` copies
    the used rows to the device (asynchronously on CUDA) and masks the logits. A later fill
    waits for the previous copy first (``wait_copied``), so the host buffer is never
    overwritten while a copy still reads it.
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        on_cuda = self.device.type == "cuda"
        self.host = torch.full((max_rows, bitmask_words(vocab_size)), -1, dtype=torch.int32,
                               pin_memory=on_cuda)
        self._device_buf = (torch.empty_like(self.host, device=self.device)
                            if self.device.type != "cpu" else self.host)
        self._copied: torch.cuda.Event | None = None

    def warm_up(self) -> None:
        """Compile the device's masking kernel (xgrammar's Triton kernel on CUDA) before the
        first constrained step: Triton specializes on a row count of 1, a multiple of 16, or
        another, and each compile takes a fraction of a second that the step loop would
        otherwise stall on. Uses its own buffers (safe beside a running step loop)."""
        if self.device.type != "cuda":
            return
        words = self.host.shape[1]
        logits = torch.zeros(16, words * 32, dtype=torch.float32, device=self.device)
        mask = torch.zeros(16, words, dtype=torch.int32, device=self.device)
        for n in (1, 2, 16):
            apply_token_bitmask(logits[:n], mask[:n], range(n))
        torch.cuda.current_stream(self.device).synchronize()

    def wait_copied(self) -> None:
        """Block until the last ``apply``'s host-to-device copy has read the host buffer."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def apply(self, logits: torch.Tensor, rows: Sequence[int]) -> None:
        """Mask ``logits`` rows ``rows`` with the host rows of the same index."""
        rows = list(rows)
        if not rows:
            return
        n = max(rows) + 1
        if n > self.host.shape[0]:
            raise ValueError(f"bitmask row {n - 1} is past its {self.host.shape[0]} rows")
        device_mask = self._device_buf
        if device_mask is not self.host:
            device_mask[:n].copy_(self.host[:n], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        apply_token_bitmask(logits, device_mask[:n], rows)
