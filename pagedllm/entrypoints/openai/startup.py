"""The server's start-up clock: what each phase of `pagedllm serve` took, from the
process's own start to the first moment it answers HTTP, in one log line.

    Ready in 2.9 s: interpreter and imports 1.3 s, model config 0.8 s, engine 0.6 s
    (engine core on a thread), HTTP server 0.2 s; heavy modules imported: torch, ...;
    not imported: triton, ...

The phases are marked by `run_server`; the module lists name which of the large
libraries the serve path has imported by then (what is left to make lazy) and which it
has kept out.
"""

from __future__ import annotations

import os
import sys
import time

# Large libraries whose import costs a serving process start-up time or memory.
HEAVY_MODULES = ("torch", "transformers", "fastapi", "uvicorn", "numpy", "gguf", "jinja2",
                 "tokenizers", "triton", "torch._inductor", "torch.distributed.tensor",
                 "sympy", "accelerate", "llguidance", "xgrammar", "safetensors")
PHASES = ("interpreter and imports", "model config", "engine", "HTTP server")


def process_start_time() -> float:
    """This process's start as a `time.time()` value (from /proc on Linux; elsewhere, the
    first call's time)."""
    now = time.time()
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return now
    return now - max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)


class StartupClock:
    """Phases of one server start: `mark(phase)` ends the named phase now."""

    def __init__(self, start: float | None = None) -> None:
        self.start = process_start_time() if start is None else start
        self._last = self.start
        self.phases: list[tuple[str, float]] = []
        self.notes: dict[str, str] = {}

    def mark(self, phase: str, note: str | None = None) -> None:
        now = time.time()
        self.phases.append((phase, max(now - self._last, 0.0)))
        self._last = now
        if note:
            self.notes[phase] = note

    @property
    def total(self) -> float:
        return self._last - self.start

    def summary(self) -> str:
        """The start-up log line."""
        parts = []
        for phase, seconds in self.phases:
            note = self.notes.get(phase)
            parts.append(f"{phase} {seconds:.2f} s" + (f" ({note})" if note else ""))
        loaded = [m for m in HEAVY_MODULES if m in sys.modules]
        kept_out = [m for m in HEAVY_MODULES if m not in sys.modules]
        return (f"Ready in {self.total:.2f} s: {', '.join(parts)}; heavy modules imported: "
                f"{', '.join(loaded) or 'none'}; not imported: {', '.join(kept_out) or 'none'}")
