"""pagedllm.pdl's switch: PDL only on CUDA, never under the Triton interpreter or with
PAGEDLLM_PDL=0, and its launch keyword only when enabled."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.pdl import launch_options, pdl_enabled  # noqa: E402


def test_pdl_off_on_the_cpu_and_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("PAGEDLLM_PDL", "0")
    assert not pdl_enabled(torch.device("cuda", 0))  # decided before any CUDA query
    monkeypatch.delenv("PAGEDLLM_PDL")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda", 0))


def test_launch_options_only_when_enabled() -> None:
    assert launch_options(True) == {"launch_pdl": True}
    assert launch_options(False) == {}
