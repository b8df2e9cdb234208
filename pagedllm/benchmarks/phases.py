"""Wall time per engine phase (schedule, input preparation, execute, update, outputs).

`instrument(llm)` wraps the phases of a live LLM's engine with timers; `report(...)` prints
milliseconds per step for each. "launch" is `execute` (inputs, forward, sampler queued; with
a grammar or penalties also collecting the previous step), "wait" is `fetch`, waiting for the
device; "forward_launch", "logits_pipeline" and "grammar_fill" (the bitmask rows, host side)
are parts of "launch".
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


def _wrap(obj: Any, name: str, key: str, totals: Counter) -> None:
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start
            if key == "schedule":
                totals["steps"] += 1

    setattr(obj, name, timed)


def instrument(llm: Any) -> Counter:
    """Start timing the engine's phases; returns the running totals (seconds)."""
    totals: Counter = Counter()
    engine = llm.engine
    runner = getattr(engine.executor, "runner", None)
    _wrap(engine.scheduler, "schedule", "schedule", totals)
    _wrap(engine.executor, "execute", "launch", totals)
    _wrap(engine.executor, "fetch", "wait", totals)
    if runner is not None:
        _wrap(runner, "prepare_host_inputs", "prepare_host_inputs", totals)
        _wrap(runner, "run_model", "forward_launch", totals)
        _wrap(runner, "_logits_pipeline", "logits_pipeline", totals)
        _wrap(runner, "_sampling_metadata", "sampling_metadata", totals)
    core = getattr(engine, "core", None)
    if hasattr(core, "_grammar_output"):
        _wrap(core, "_grammar_output", "grammar_fill", totals)
    _wrap(engine.scheduler, "update", "update", totals)
    _wrap(engine.output_processor, "process", "output_processing", totals)
    return totals


def report(totals: Counter) -> str:
    steps = max(totals.get("steps", 0), 1)
    parts = [f"{key} {1e3 * value / steps:.3f}" for key, value in totals.items()
             if key != "steps"]
    return f"ms per step over {steps} steps: " + ", ".join(parts)
