"""The CPU engine's torch thread count, chosen from measured forward times.

On a machine whose cores other processes share, more OpenMP threads are not always
faster: every parallel matmul waits at its barrier for a thread the OS has descheduled, and
a 2-core machine with one busy core ran decode steps 2-25x slower at two threads than at one
(benchmarks/RESULTS.md, issue 17), while with a free core two threads were 1.3-1.9x faster.
`ThreadTuner` keeps the better of one thread and all of them, by measurement: it runs at
the current count, and every `period` forwards it runs `probe` forwards at the other count
and compares them with the same shapes' recent times at the current count (the forward's
token count is the shape key); it switches when the other is faster by `margin`. At all
the threads it also probes at once after `slow_run` forwards in a row take `slowdown` times
their shape's median (a core was taken: waiting for the periodic probe left one measured
serving round at a tenth of its speed); at one thread a slowdown only waits.

Used when the thread count is left to the engine (no `--cpu-threads`, no
PAGEDLLM_CPU_THREADS) and more than one core is available.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def shape_key(num_tokens: int) -> int:
    """Forwards of equal keys are compared: the token count up to 64, then powers of two."""
    return num_tokens if num_tokens <= 64 else 1 << (num_tokens - 1).bit_length()


class ThreadTuner:
    """Picks 1 or `max_threads` torch threads for the forwards of one CPU engine."""

    def __init__(self, max_threads: int, period: int = 128, probe: int = 6,
                 margin: float = 0.07, first_probe: int = 16, history: int = 24,
                 slowdown: float = 2.0, slow_run: int = 3,
                 clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        if max_threads < 2:
            raise ValueError(f"ThreadTuner needs max_threads >= 2, got {max_threads}.")
        if probe < 1 or period <= probe:
            raise ValueError("ThreadTuner needs probe >= 1 and period > probe.")
        self.choices = (1, max_threads)
        self.current = 1  # safe under load; the first probe tries the other soon
        self.period = period
        self.probe = probe
        self.margin = margin
        self._clock = clock
        self._set_threads = set_threads
        self._until_probe = first_probe
        self._probing = 0  # forwards left in the running probe
        self._history: dict[tuple[int, int], deque[float]] = {}
        self._history_len = history
        self._ratios: list[float] = []
        self._slowdown = slowdown
        self._slow_run = slow_run
        self._slow = 0  # forwards in a row this much slower than their shape's median
        self.switches = 0
        set_threads(self.current)

    @property
    def probing(self) -> bool:
        """Whether the forwards now run at the other count, to compare."""
        return self._probing > 0

    @property
    def other(self) -> int:
        return self.choices[1] if self.current == self.choices[0] else self.choices[0]

    def _times(self, threads: int, key: int) -> deque[float]:
        times = self._history.get((threads, key))
        if times is None:
            times = self._history[(threads, key)] = deque(maxlen=self._history_len)
        return times

    @contextmanager
    def step(self, num_tokens: int) -> Iterator[None]:
        """Time one forward of `num_tokens` tokens (at the count this tuner picks for it)."""
        if not self._probing and self._until_probe <= 0:
            self._probing = self.probe
            self._ratios = []
            self._set_threads(self.other)
        threads = self.other if self._probing else self.current
        key = shape_key(num_tokens)
        start = self._clock()
        yield
        elapsed = self._clock() - start
        if not self._probing:
            times = self._times(threads, key)
            if threads == self.choices[1] and len(times) >= self._history_len // 3:
                slow = elapsed > self._slowdown * statistics.median(times)
                self._slow = self._slow + 1 if slow else 0
            times.append(elapsed)
            self._until_probe -= 1
            if self._slow >= self._slow_run:
                # probe one thread at the next forward, against the slow forwards only
                recent = list(times)[-self._slow_run:]
                times.clear()
                times.extend(recent)
                self._slow = 0
                self._until_probe = 0
            return
        baseline = self._history.get((self.current, key))
        if baseline:
            self._ratios.append(elapsed / statistics.median(baseline))
        self._times(threads, key).append(elapsed)
        self._probing -= 1
        if not self._probing:
            self._finish_probe()

    def _finish_probe(self) -> None:
        self._until_probe = self.period
        if self._ratios and statistics.median(self._ratios) < 1.0 - self.margin:
            self.current = self.other
            self.switches += 1
            return  # the probe's count is already set
        self._set_threads(self.current)
