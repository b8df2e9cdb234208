"""The CPU engine's torch threads: cpu_threads / --cpu-threads, else PAGEDLLM_CPU_THREADS,
else the cores this process may use; bad values are refused naming the setting."""

from __future__ import annotations

import os

import pytest

from pagedllm.config import EngineArgs


def _threads(model: str, **kwargs) -> int | None:
    return EngineArgs(model=model, device="cpu", **kwargs).create_engine_config(
    ).device.cpu_threads


def test_flag_then_environment_then_cores(tiny_llama, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CPU_THREADS", "3")
    assert _threads(tiny_llama, cpu_threads=2) == 2
    assert _threads(tiny_llama) == 3
    monkeypatch.delenv("PAGEDLLM_CPU_THREADS")
    assert _threads(tiny_llama) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("kwargs, env, match", [
    ({"cpu_threads": 0}, None, "cpu_threads"),
    ({"cpu_threads": -2}, None, "cpu_threads"),
    ({}, "many", "PAGEDLLM_CPU_THREADS"),
    ({}, "0", "cpu_threads"),
])
def test_bad_thread_counts_are_refused(tiny_llama, monkeypatch, kwargs, env, match):
    if env is not None:
        monkeypatch.setenv("PAGEDLLM_CPU_THREADS", env)
    with pytest.raises(ValueError, match=match):
        _threads(tiny_llama, **kwargs)


def test_adaptive_only_when_the_count_is_left_to_the_engine(tiny_llama, monkeypatch):
    def adaptive(**kwargs) -> bool:
        return EngineArgs(model=tiny_llama, device="cpu", **kwargs).create_engine_config(
        ).device.cpu_threads_adaptive

    monkeypatch.setenv("PAGEDLLM_CPU_THREADS", "2")
    assert not adaptive()
    monkeypatch.delenv("PAGEDLLM_CPU_THREADS")
    assert not adaptive(cpu_threads=2)
    assert adaptive() == (len(os.sched_getaffinity(0)) > 1)


class _FakeMachine:
    """A clock whose forwards take `cost[threads]` seconds, and the thread setting."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost = cost
        self.now = 0.0
        self.threads = 0
        self.sets = 0

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.sets += 1

    def forward(self, tuner, num_tokens: int = 1) -> None:
        with tuner.step(num_tokens):
            self.now += self.cost[self.threads]


def _tuner(machine: _FakeMachine):
    from pagedllm.worker.cpu_threads import ThreadTuner

    return ThreadTuner(2, period=20, probe=4, first_probe=8, clock=machine.clock,
                       set_threads=machine.set_threads)


def test_tuner_moves_to_the_faster_count_and_back():
    machine = _FakeMachine({1: 0.020, 2: 0.012})
    tuner = _tuner(machine)
    assert machine.threads == 1  # starts safe
    for _ in range(12):  # 8 at one thread, then a 4-forward probe at two
        machine.forward(tuner)
    assert tuner.current == 2 and machine.threads == 2 and tuner.switches == 1
    machine.cost[2] = 0.080  # the second core got busy: two threads collapse
    for _ in range(30):
        machine.forward(tuner)
    assert tuner.current == 1 and machine.threads == 1 and tuner.switches == 2


def test_tuner_keeps_the_count_when_the_other_is_not_faster():
    machine = _FakeMachine({1: 0.020, 2: 0.0195})  # within the margin
    tuner = _tuner(machine)
    for _ in range(100):  # 8, probe 4, then 20 and a probe of 4, three times, then 16
        machine.forward(tuner)
    assert not tuner.probing and tuner.current == 1 and machine.threads == 1 and tuner.switches == 0
    assert machine.sets > 2  # it did probe, and set the count back after each probe


def test_tuner_compares_only_equal_shapes():
    machine = _FakeMachine({1: 0.020, 2: 0.012})
    tuner = _tuner(machine)
    for _ in range(8):
        machine.forward(tuner, num_tokens=1)
    for _ in range(4):  # the probe sees only a shape it has no baseline for
        machine.forward(tuner, num_tokens=300)
    assert tuner.current == 1 and tuner.switches == 0


def test_tuner_refuses_bad_settings():
    from pagedllm.worker.cpu_threads import ThreadTuner

    with pytest.raises(ValueError, match="max_threads"):
        ThreadTuner(1)
    with pytest.raises(ValueError, match="probe"):
        ThreadTuner(2, period=4, probe=4, set_threads=lambda n: None)


def test_tuner_leaves_a_collapsed_thread_count_at_once():
    machine = _FakeMachine({1: 0.020, 2: 0.012})
    tuner = _tuner(machine)
    for _ in range(12 + 10):  # at two threads, with a history of fast forwards
        machine.forward(tuner)
    assert tuner.current == 2
    machine.cost[2] = 0.200  # a core got taken: two threads collapse
    for _ in range(3 + 4):  # three slow forwards, then the probe at one thread
        machine.forward(tuner)
    assert tuner.current == 1 and machine.threads == 1  # well before the 20-forward period


def test_tuner_at_one_thread_waits_out_a_slowdown():
    machine = _FakeMachine({1: 0.020, 2: 0.050})
    tuner = _tuner(machine)
    for _ in range(12 + 10):
        machine.forward(tuner)
    assert tuner.current == 1
    sets = machine.sets
    machine.cost[1] = 0.100  # slower at one thread too: no early probe of two
    for _ in range(10):
        machine.forward(tuner)
    assert machine.sets == sets and machine.threads == 1
