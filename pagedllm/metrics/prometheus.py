"""Prometheus metrics (`GET /metrics`), named like vLLM's under a `pagedllm:` prefix.

Each server app owns a `CollectorRegistry`; nothing registers in prometheus_client's global
registry. Every metric carries the `model_name` label; finished requests also carry
`finished_reason` (stop, length, abort).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pagedllm.metrics.stats import IterationStats, SchedulerSnapshot

PREFIX = "pagedllm:"
FINISH_REASONS = ("stop", "length", "abort")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 320.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

# name (without prefix) -> help text, in the order /metrics lists them.
METRIC_HELP: dict[str, str] = {
    "num_requests_running": "Number of requests in the running batch.",
    "num_requests_waiting": "Number of requests waiting to be scheduled (incl. preempted).",
    "kv_cache_usage_perc": "Fraction of KV cache blocks in use (1 = all).",
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "num_preemptions": "Preemptions of running requests (blocks freed, recomputed later).",
    "prompt_tokens": "Prompt tokens processed (counted once per sequence, at its first token).",
    "generation_tokens": "Generated tokens.",
    "request_success": "Finished requests (sequences) by finished_reason.",
    "time_to_first_token_seconds": "Time from arrival to the first generated token.",
    "time_per_output_token_seconds": "Mean time between output tokens of a finished request.",
    "e2e_request_latency_seconds": "Time from arrival to finish of a request.",
    "request_queue_time_seconds": "Time from arrival to first scheduling of a request.",
    "request_prefill_time_seconds": "Time from first scheduling to the first token.",
    "request_decode_time_seconds": "Time from the first token to the finish.",
    "request_prompt_tokens": "Prompt length of finished requests.",
    "request_generation_tokens": "Generated tokens of finished requests.",
    "spec_decode_num_drafts": "Speculative decoding: draft runs verified (one per request "
                              "and step).",
    "spec_decode_num_draft_tokens": "Speculative decoding: draft tokens verified.",
    "spec_decode_num_accepted_tokens": "Speculative decoding: draft tokens accepted.",
    "spec_decode_num_accepted_tokens_per_pos": "Speculative decoding: draft tokens accepted "
                                               "at each position of a draft run (0 = first).",
}


class PrometheusStatLogger:
    """Updates the metrics of one model in its own registry from the engine's stats."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str) -> Gauge:
            return Gauge(PREFIX + name, METRIC_HELP[name], labels, registry=self.registry)

        def counter(name: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, METRIC_HELP[name], labels + list(extra),
                           registry=self.registry)

        def histogram(name: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, METRIC_HELP[name], labels, buckets=buckets,
                             registry=self.registry)

        m = model_name
        self.running = gauge("num_requests_running").labels(m)
        self.waiting = gauge("num_requests_waiting").labels(m)
        self.kv_usage = gauge("kv_cache_usage_perc").labels(m)
        self.prefix_queries = counter("prefix_cache_queries").labels(m)
        self.prefix_hits = counter("prefix_cache_hits").labels(m)
        self.preemptions = counter("num_preemptions").labels(m)
        self.prompt_tokens = counter("prompt_tokens").labels(m)
        self.generation_tokens = counter("generation_tokens").labels(m)
        self._success = counter("request_success", ("finished_reason",))
        self._model_name = m
        self.finished = {r: self._success.labels(m, r) for r in FINISH_REASONS}
        self.ttft = histogram("time_to_first_token_seconds", _LATENCY_BUCKETS).labels(m)
        self.tpot = histogram("time_per_output_token_seconds", _TPOT_BUCKETS).labels(m)
        self.e2e = histogram("e2e_request_latency_seconds", _LATENCY_BUCKETS).labels(m)
        self.queue = histogram("request_queue_time_seconds", _LATENCY_BUCKETS).labels(m)
        self.prefill = histogram("request_prefill_time_seconds", _LATENCY_BUCKETS).labels(m)
        self.decode = histogram("request_decode_time_seconds", _LATENCY_BUCKETS).labels(m)
        self.req_prompt = histogram("request_prompt_tokens", _TOKEN_BUCKETS).labels(m)
        self.req_gen = histogram("request_generation_tokens", _TOKEN_BUCKETS).labels(m)
        self._last: SchedulerSnapshot | None = None
        self.spec_drafts = counter("spec_decode_num_drafts").labels(m)
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens").labels(m)
        self.spec_accepted = counter("spec_decode_num_accepted_tokens").labels(m)
        self._spec_per_pos = counter("spec_decode_num_accepted_tokens_per_pos", ("position",))
        self.spec_per_pos: list = []

    def record(self, snapshot: SchedulerSnapshot, iteration: IterationStats,
               now: float) -> None:
        self.running.set(snapshot.num_running)
        self.waiting.set(snapshot.num_waiting)
        self.kv_usage.set(snapshot.kv_cache_usage)
        last = self._last
        if last is None or snapshot != last:
            self.prefix_queries.inc(snapshot.prefix_cache_queries
                                    - (last.prefix_cache_queries if last else 0))
            self.prefix_hits.inc(snapshot.prefix_cache_hits
                                 - (last.prefix_cache_hits if last else 0))
            self.preemptions.inc(snapshot.num_preemptions
                                 - (last.num_preemptions if last else 0))
            self._last = snapshot
        if iteration.num_prompt_tokens:
            self.prompt_tokens.inc(iteration.num_prompt_tokens)
        if iteration.num_generation_tokens:
            self.generation_tokens.inc(iteration.num_generation_tokens)
        if iteration.spec_num_drafts:
            self._record_spec_decode(iteration)
        for ttft in iteration.time_to_first_tokens:
            self.ttft.observe(ttft)
        for f in iteration.finished:
            finished = self.finished.get(f.finish_reason)
            if finished is None:
                finished = self.finished[f.finish_reason] = self._success.labels(
                    self._model_name, f.finish_reason)
            finished.inc()
            self.e2e.observe(f.e2e_latency)
            self.queue.observe(f.queued_time)
            self.prefill.observe(f.prefill_time)
            self.decode.observe(f.decode_time)
            self.req_prompt.observe(f.num_prompt_tokens)
            self.req_gen.observe(f.num_generation_tokens)
            tpot = f.time_per_output_token
            if tpot is not None:
                self.tpot.observe(tpot)

    def _record_spec_decode(self, iteration: IterationStats) -> None:
        self.spec_drafts.inc(iteration.spec_num_drafts)
        self.spec_draft_tokens.inc(iteration.spec_num_draft_tokens)
        self.spec_accepted.inc(iteration.spec_num_accepted_tokens)
        per_pos = iteration.spec_accepted_per_pos
        while len(self.spec_per_pos) < len(per_pos):
            self.spec_per_pos.append(self._spec_per_pos.labels(
                self._model_name, str(len(self.spec_per_pos))))
        for counter, count in zip(self.spec_per_pos, per_pos):
            counter.inc(count)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
