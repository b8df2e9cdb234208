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
