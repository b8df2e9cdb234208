"""Tiny Triton kernel cases (attention, fused layer ops) on the CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, so the cases run in a
subprocess (tests/gpu/test_triton_attention.py run as a script). Skipped without triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,marker", [
    ("test_triton_attention.py", "INTERPRETER_OK"),
    ("test_fused_ops.py", "FUSED_INTERPRETER_OK"),
    ("test_triton_sampling.py", "SAMPLING_INTERPRETER_OK"),
    ("test_fused_moe.py", "MOE_INTERPRETER_OK"),
    ("test_quant_kernels.py", "QUANT_INTERPRETER_OK"),
])
def test_triton_kernels_under_interpreter(script: str, marker: str) -> None:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gpu" / script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr and "torch" in proc.stderr:
        pytest.skip("torch not importable in the subprocess")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert marker in proc.stdout
