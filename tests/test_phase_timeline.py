"""The benchmark's device timeline (pagedllm.benchmarks.phases) from per-step events."""

from __future__ import annotations

from pagedllm.benchmarks.phases import PhaseTimes, StepRecord, StepTimeline, report, timeline_report


class FakeEvent:
    """A device event at a fixed time (ms), as torch.cuda.Event.elapsed_time reads it."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, later: FakeEvent) -> float:
        return later.ms - self.ms


def test_spans_and_gaps_per_step_kind():
    timeline = StepTimeline()
    # prefill 0-100 ms, gap 5, decode 105-135, gap 300 (a stall), decode 435-465
    # the second step made the pinned allocator create 2 blocks (40 ms of CUDA host allocs)
    for kind, begin, end, blocks in [("prefill", 0, 100, 0), ("decode", 105, 135, 2),
                                     ("decode", 435, 465, 0)]:
        timeline.steps.append(StepRecord(kind, 8, begin / 1e3, begin / 1e3 + 0.01,
                                         FakeEvent(begin), FakeEvent(end), blocks,
                                         20.0 * blocks))
    timeline.host_calls += [("schedule", 0.12, 0.13), ("gc gen 2", 0.13, 0.43),
                            ("update", 0.5, 0.51),  # after the last launch
                            ("forward_launch", 0.001, 0.004),  # inside the prefill's execute
                            ("gc gen 0", 0.002, 0.003)]  # inside a part: not counted again
    text = timeline_report(timeline)
    assert "decode: 2 steps, span 0.060, gap 0.305 (median 300.00 ms, max 300.0 ms, " \
           "2 over 2 ms: 0.305), host 0.020; pinned blocks created 2 (40.0 ms)" in text, text
    assert "prefill: 1 steps, span 0.100, gap 0.000" in text, text
    assert "prefill execute by part (s): other 0.007, forward_launch 0.003" in text, text
    assert "decode execute by part (s): other 0.020" in text, text
    assert "all: span 0.160 + gaps 0.305 = 0.465" in text, text
    assert "gap 300.0 ms before step 2 (decode, 8 requests); host between the launches " \
           "320.0 ms: gc gen 2 300.0, schedule 10.0; the step before: execute 10.0 ms of " \
           "its 30.0 ms span, pinned blocks created 2 (40.0 ms)" in text, text
    assert report(PhaseTimes(timeline=timeline)).endswith(text)  # after the phase times
