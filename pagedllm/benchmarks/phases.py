"""Wall time per engine phase (schedule, input preparation, execute, update, outputs).

`instrument(llm)` wraps the phases of a live LLM's engine with timers; `report(...)` prints
milliseconds per step for each. "launch" is `execute` (inputs, forward, sampler queued; with
a grammar or penalties also collecting the previous step), "wait" is `fetch`, waiting for the
device; "prepare_host_inputs", "device_inputs" (the inputs' copies queued), "forward_launch",
"lm_head", "logits_pipeline", "grammar_fill" (the bitmask rows, host side),
"sampling_metadata", "sample" and "result_copy" (the results' copy to the host queued) are
parts of "launch".

On CUDA, `instrument` also records two events per step on the device's stream, at the start
and at the end of `execute`: `timeline_report(...)` splits the device's time into each step
kind's span (start to end, the step's work plus any wait for its own launches) and the gaps
between steps (the device idle until the host launched the next step), and names what the
host did during the longest gaps (the timed phases and garbage collections in that window)
and, per step kind, where the host's `execute` time went (a part that waits for the device
shows there).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

HostCall = tuple[str, float, float]  # (phase or "gc gen N", start, end), perf_counter seconds


def _wrap(obj: Any, name: str, key: str, totals: Counter,
          calls: list[HostCall] | None = None) -> None:
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            now = time.perf_counter()
            totals[key] += now - start
            if key == "schedule":
                totals["steps"] += 1
            if calls is not None:
                calls.append((key, start, now))

    setattr(obj, name, timed)


class StepRecord(NamedTuple):
    """One launched step: its kind, its number of requests, the host interval of its
    `execute` (perf_counter seconds), the device events recorded at its start and end, and
    the pinned host blocks its `execute` made torch's host allocator create (new CUDA host
    allocations, which may wait for the device) with their milliseconds."""
    kind: str
    batch: int
    host_begin: float
    host_end: float
    begin: Any
    end: Any
    pinned_blocks: int = 0
    pinned_alloc_ms: float = 0.0


def pinned_counts() -> tuple[int, float]:
    """torch's pinned host allocator so far: blocks created and milliseconds in their CUDA
    allocations ((0, 0.0) where this torch does not report them)."""
    import torch

    stats_of = getattr(torch.cuda, "host_memory_stats", None)
    if stats_of is None:
        return 0, 0.0
    stats = stats_of()
    return int(stats.get("num_host_alloc", 0)), stats.get("host_alloc_time.total", 0) / 1e3


@dataclass
class StepTimeline:
    """The launched steps, and every timed host call and garbage collection (to name what
    the host was doing while the device waited)."""
    steps: list[StepRecord] = field(default_factory=list)
    host_calls: list[HostCall] = field(default_factory=list)
    frozen_at_full: set[int] = field(default_factory=set)  # gc.get_freeze_count() then


def _wrap_timeline(executor: Any, timeline: StepTimeline) -> None:
    import torch

    inner = executor.execute

    def timed(out: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(out, "is_empty", False):
            return inner(out, *args, **kwargs)
        begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        blocks, alloc_ms = pinned_counts()
        host_begin = time.perf_counter()
        begin.record()
        try:
            return inner(out, *args, **kwargs)
        finally:
            end.record()
            host_end = time.perf_counter()
            blocks_now, alloc_ms_now = pinned_counts()
            tokens = getattr(out, "num_scheduled_tokens", None) or []
            kind = "decode" if tokens and max(tokens) == 1 else "prefill"  # mixed: prefill
            timeline.steps.append(StepRecord(kind, len(tokens), host_begin, host_end, begin,
                                             end, blocks_now - blocks, alloc_ms_now - alloc_ms))

    executor.execute = timed


def _time_collections(timeline: StepTimeline) -> None:
    import gc

    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            timeline.host_calls.append((f"gc gen {info['generation']}", started.pop(),
                                        time.perf_counter()))
            if info["generation"] == 2:
                timeline.frozen_at_full.add(gc.get_freeze_count())

    gc.callbacks.append(callback)


@dataclass
class PhaseTimes:
    """Running totals (seconds, and "steps") and, on CUDA, the per-step device timeline and
    the caching allocator's counts when timing began."""
    totals: Counter = field(default_factory=Counter)
    timeline: StepTimeline | None = None
    allocator_start: dict[str, int] | None = None


_ALLOCATOR_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


def allocator_counts() -> dict[str, int]:
    """The CUDA caching allocator's retries (each frees its cache, a device sync), device
    mallocs and frees so far."""
    import torch

    stats = torch.cuda.memory_stats()
    return {key: stats.get(key, 0) for key in _ALLOCATOR_KEYS}


def allocator_delta(before: dict[str, int]) -> str:
    """The allocator's counts since `before`, as text."""
    now = allocator_counts()
    return ", ".join(f"{key} +{now[key] - before[key]}" for key in _ALLOCATOR_KEYS)


def instrument(llm: Any) -> PhaseTimes:
    """Start timing the engine's phases; the returned object fills as the engine runs."""
    times = PhaseTimes()
    totals = times.totals
    engine = llm.engine
    runner = getattr(engine.executor, "runner", None)
    calls = None
    if runner is not None and getattr(runner, "device", None) is not None \
            and runner.device.type == "cuda":
        times.timeline = StepTimeline()
        times.allocator_start = allocator_counts()
        calls = times.timeline.host_calls
        _time_collections(times.timeline)
    _wrap(engine.scheduler, "schedule", "schedule", totals, calls)
    _wrap(engine.executor, "execute", "launch", totals)
    _wrap(engine.executor, "fetch", "wait", totals, calls)
    if runner is not None:
        _wrap(runner, "prepare_host_inputs", "prepare_host_inputs", totals, calls)
        _wrap(runner, "device_inputs", "device_inputs", totals, calls)
        _wrap(runner, "run_model", "forward_launch", totals, calls)
        _wrap(runner, "_logits_pipeline", "logits_pipeline", totals, calls)
        _wrap(runner, "_sampling_metadata", "sampling_metadata", totals, calls)
        _wrap(runner, "_start_copy", "result_copy", totals, calls)
        if hasattr(runner, "model"):
            _wrap(runner.model, "compute_logits", "lm_head", totals, calls)
        if hasattr(getattr(runner, "sampler", None), "sample"):
            _wrap(runner.sampler, "sample", "sample", totals, calls)
    if times.timeline is not None:
        _wrap_timeline(engine.executor, times.timeline)
    core = getattr(engine, "core", None)
    if hasattr(core, "_grammar_output"):
        _wrap(core, "_grammar_output", "grammar_fill", totals)
    _wrap(engine.scheduler, "update", "update", totals, calls)
    _wrap(engine.output_processor, "process", "output_processing", totals, calls)
    return times


def _execute_parts(timeline: StepTimeline) -> dict[str, Counter]:
    """Per step kind, seconds of each timed host call inside the steps' `execute` intervals
    (its parts), and "other" for the rest of those intervals."""
    calls = sorted(timeline.host_calls, key=lambda call: call[1])
    starts = [call[1] for call in calls]
    parts: dict[str, Counter] = {}
    for step in timeline.steps:
        kind = parts.setdefault(step.kind, Counter())
        inside = 0.0
        for name, start, end in calls[bisect.bisect_left(starts, step.host_begin):
                                      bisect.bisect_right(starts, step.host_end)]:
            if end <= step.host_end and not name.startswith("gc "):
                kind[name] += end - start
                inside += end - start
        kind["other"] += max(0.0, step.host_end - step.host_begin - inside)
    return parts


def report(times: PhaseTimes) -> str:
    """Milliseconds per step of each phase, then the device timeline when there is one (the
    device must be synchronized first)."""
    totals = times.totals
    steps = max(totals.get("steps", 0), 1)
    parts = [f"{key} {1e3 * value / steps:.3f}" for key, value in totals.items()
             if key != "steps"]
    text = f"ms per step over {steps} steps: " + ", ".join(parts)
    if times.timeline is not None and times.timeline.steps:
        text += "\n" + timeline_report(times.timeline)
    if times.allocator_start is not None:
        text += "\nallocator: " + allocator_delta(times.allocator_start)
    return text


def timeline_report(timeline: StepTimeline, worst: int = 5) -> str:
    """Device seconds per step kind (spans) and between steps (gaps), from the events, and
    the `worst` gaps with what the host did meanwhile; the device must be idle
    (synchronized) when it is called."""
    spans: Counter = Counter()
    host: Counter = Counter()
    pinned: Counter = Counter()
    pinned_ms: Counter = Counter()
    gaps: dict[str, list[float]] = {}
    counts: Counter = Counter()
    each_gap: list[tuple[float, int]] = []
    steps = timeline.steps
    for i, step in enumerate(steps):
        counts[step.kind] += 1
        spans[step.kind] += step.begin.elapsed_time(step.end) / 1e3
        host[step.kind] += step.host_end - step.host_begin
        pinned[step.kind] += step.pinned_blocks
        pinned_ms[step.kind] += step.pinned_alloc_ms
        if i:
            gap = steps[i - 1].end.elapsed_time(step.begin) / 1e3
            gaps.setdefault(step.kind, []).append(gap)
            each_gap.append((gap, i))
    lines = ["device timeline (s): kind, steps, span (launch to end on the device), gap before "
             "(device idle), host execute"]
    for kind in sorted(counts):
        before = sorted(gaps.get(kind, [0.0]))
        long = [g for g in before if g > 2e-3]
        lines.append(f"  {kind}: {counts[kind]} steps, span {spans[kind]:.3f}, gap "
                     f"{sum(before):.3f} (median {1e3 * before[len(before) // 2]:.2f} ms, "
                     f"max {1e3 * before[-1]:.1f} ms, {len(long)} over 2 ms: {sum(long):.3f}), "
                     f"host {host[kind]:.3f}; pinned blocks created {pinned[kind]} "
                     f"({pinned_ms[kind]:.1f} ms)")
    for kind, parts in sorted(_execute_parts(timeline).items()):
        listed = ", ".join(f"{name} {seconds:.3f}" for name, seconds in parts.most_common())
        lines.append(f"  {kind} execute by part (s): {listed}")
    all_gaps = sum(gap for gap, _ in each_gap)
    lines.append(f"  all: span {sum(spans.values()):.3f} + gaps {all_gaps:.3f} "
                 f"= {sum(spans.values()) + all_gaps:.3f}")
    if timeline.frozen_at_full:
        lines.append("  objects frozen (gc.freeze) at the full collections: "
                     + ", ".join(str(n) for n in sorted(timeline.frozen_at_full)))
    for gap, i in sorted(each_gap, reverse=True)[:worst]:
        if gap <= 2e-3:
            break
        w0, w1 = steps[i - 1].host_end, steps[i].host_begin
        busy = sorted(((min(end, w1) - max(start, w0), name)
                       for name, start, end in timeline.host_calls
                       if start < w1 and end > w0), reverse=True)[:4]
        doing = ", ".join(f"{name} {1e3 * d:.1f}" for d, name in busy)
        prev = steps[i - 1]
        lines.append(f"  gap {1e3 * gap:.1f} ms before step {i} ({steps[i].kind}, "
                     f"{steps[i].batch} requests); host between the launches "
                     f"{1e3 * (w1 - w0):.1f} ms: {doing}; the step before: execute "
                     f"{1e3 * (prev.host_end - prev.host_begin):.1f} ms of its "
                     f"{prev.begin.elapsed_time(prev.end):.1f} ms span, pinned blocks "
                     f"created {prev.pinned_blocks} ({prev.pinned_alloc_ms:.1f} ms)")
    return "\n".join(lines)
