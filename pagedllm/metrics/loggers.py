"""Stat loggers fed by the engine thread: `record(snapshot, iteration, now)` once per loop
turn (also every half second while idle, with an empty iteration).

- `LoggingStatLogger`: one log line every `interval` seconds while there is work.
- `ThroughputHistory`: token rates and queue lengths sampled every `period` seconds over the
  last minutes, for the dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Protocol

from pagedllm.metrics.stats import IterationStats, SchedulerSnapshot

logger = logging.getLogger("pagedllm.metrics")


class StatLogger(Protocol):
    def record(self, snapshot: SchedulerSnapshot, iteration: IterationStats,
               now: float) -> None: ...


class _Window:
    """Token and prefix-cache counts since the window opened."""

    def __init__(self, now: float, snapshot: SchedulerSnapshot | None = None) -> None:
        self.start = now
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.queries0 = snapshot.prefix_cache_queries if snapshot else 0
        self.hits0 = snapshot.prefix_cache_hits if snapshot else 0
        self.spec_drafts = 0
        self.spec_draft_tokens = 0
        self.spec_accepted = 0

    def add(self, iteration: IterationStats) -> None:
        self.prompt_tokens += iteration.num_prompt_tokens
        self.generation_tokens += iteration.num_generation_tokens
        self.spec_drafts += iteration.spec_num_drafts
        self.spec_draft_tokens += iteration.spec_num_draft_tokens
        self.spec_accepted += iteration.spec_num_accepted_tokens

    def spec_decode_line(self) -> str:
        """Mean acceptance length (tokens per verify step: accepted drafts + 1) and the
        draft acceptance rate over the window; empty without speculation."""
        if not self.spec_drafts:
            return ""
        length = 1 + self.spec_accepted / self.spec_drafts
        rate = 100 * self.spec_accepted / self.spec_draft_tokens
        return (f", Spec decode: mean acceptance length {length:.2f}, "
                f"draft acceptance rate {rate:.1f}%")

    def rates(self, now: float) -> tuple[float, float]:
        """(prompt tokens/s, generation tokens/s) over the window."""
        elapsed = max(now - self.start, 1e-9)
        return self.prompt_tokens / elapsed, self.generation_tokens / elapsed

    def hit_rate(self, snapshot: SchedulerSnapshot) -> float:
        queries = snapshot.prefix_cache_queries - self.queries0
        return (snapshot.prefix_cache_hits - self.hits0) / queries if queries > 0 else 0.0


class _WindowedLogger:
    """Accumulates tokens over windows of `period` seconds; `flush` closes each window."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._window: _Window | None = None

    def record(self, snapshot: SchedulerSnapshot, iteration: IterationStats,
               now: float) -> None:
        if self._window is None:
            self._window = _Window(now, snapshot)
        self._window.add(iteration)
        if now - self._window.start >= self.period:
            window, self._window = self._window, _Window(now, snapshot)
            self.flush(window, snapshot, now)

    def flush(self, window: _Window, snapshot: SchedulerSnapshot, now: float) -> None:
        raise NotImplementedError


class LoggingStatLogger(_WindowedLogger):
    """Logs throughput, queues, KV usage and prefix hit rate every `interval` seconds while
    the engine has work (one last line after it goes idle, then silence)."""

    def __init__(self, interval: float = 5.0) -> None:
        if interval <= 0:
            raise ValueError(f"log stats interval must be > 0 seconds, got {interval}.")
        super().__init__(interval)

    def flush(self, window: _Window, snapshot: SchedulerSnapshot, now: float) -> None:
        busy = snapshot.num_running or snapshot.num_waiting
        if not busy and not window.prompt_tokens and not window.generation_tokens:
            return
        prompt_tps, gen_tps = window.rates(now)
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%%s",
            prompt_tps, gen_tps, snapshot.num_running, snapshot.num_waiting,
            100 * snapshot.kv_cache_usage, 100 * window.hit_rate(snapshot),
            window.spec_decode_line())


class ThroughputHistory(_WindowedLogger):
    """Samples of token rates and queue lengths, one per `period` seconds, `window_s` long.

    Written by the engine thread, read by the server (`samples()` copies under a lock).
    """

    def __init__(self, period: float = 2.0, window_s: float = 300.0) -> None:
        super().__init__(period)
        self._samples: deque[tuple[float, float, float, int, int]] = deque(
            maxlen=max(1, int(window_s / period)))
        self._lock = threading.Lock()

    def flush(self, window: _Window, snapshot: SchedulerSnapshot, now: float) -> None:
        prompt_tps, gen_tps = window.rates(now)
        sample = (time.time(), prompt_tps, gen_tps, snapshot.num_running, snapshot.num_waiting)
        with self._lock:
            self._samples.append(sample)

    def samples(self) -> dict[str, Any]:
        """Column lists: t (unix seconds), prompt and generation tokens/s, running, waiting."""
        with self._lock:
            rows = list(self._samples)
        cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
        return {"period_s": self.period, "t": [round(t, 2) for t in cols[0]],
                "prompt_tps": [round(x, 1) for x in cols[1]],
                "generation_tps": [round(x, 1) for x in cols[2]],
                "running": list(cols[3]), "waiting": list(cols[4])}
