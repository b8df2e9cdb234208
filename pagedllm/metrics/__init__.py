"""Engine statistics: per-step collection in the engine thread, and the loggers fed by it
(periodic log line, Prometheus metrics, dashboard history)."""

from pagedllm.metrics.stats import (
    FinishedRequestStats,
    IterationStats,
    SchedulerSnapshot,
    StatsCollector,
)

__all__ = ["FinishedRequestStats", "IterationStats", "SchedulerSnapshot", "StatsCollector"]
