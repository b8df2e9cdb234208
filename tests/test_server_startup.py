"""`pagedllm serve` start-up on the CPU: the engine core on a thread of the one server
process, and the start-up log line that says what the time went to."""

from __future__ import annotations

import re

import httpx
import psutil
import pytest
from model_utils import make_tiny_model
from server_utils import RemoteServer

from pagedllm.entrypoints.openai.startup import HEAVY_MODULES, PHASES, StartupClock

ARGS = ["--device", "cpu", "--max-model-len", "256", "--num-gpu-blocks-override", "64",
        "--disable-uvicorn-access-log"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("startup_llama"), "llama")


def _ready_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "Ready in" in line]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_cpu_server_runs_its_core_on_a_thread_and_logs_its_start_up(model_path):
    with RemoteServer(model_path, ARGS) as server:
        assert server.proc is not None
        # One process: no engine core process, no multiprocessing helper.
        assert psutil.Process(server.proc.pid).children(recursive=True) == []
        body = {"model": model_path, "prompt": "Hello", "max_tokens": 5, "temperature": 0,
                "ignore_eos": True}
        reply = httpx.post(server.url_for("v1", "completions"), json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
        line = _ready_line(server.log())
    assert "Server stopped." in server.log()
    match = re.search(r"Ready in ([\d.]+) s: (.*); heavy modules imported: (.*); "
                      r"not imported: (.*)$", line)
    assert match, line
    phases = re.findall(r"([a-zA-Z ]+?) ([\d.]+) s(?: \(([^)]*)\))?(?:, |$)", match[2])
    assert [name.strip() for name, _, _ in phases] == list(PHASES), line
    assert dict((n.strip(), note) for n, _, note in phases)["engine"] == (
        "engine core on a thread")
    total = float(match[1])
    assert abs(sum(float(s) for _, s, _ in phases) - total) < 0.05, line
    imported = match[3].split(", ")
    kept_out = match[4].split(", ")
    assert "torch" in imported and "triton" in kept_out, line
    assert sorted(imported + kept_out) == sorted(HEAVY_MODULES), line


def test_core_process_on_request_is_named_in_the_start_up_line(model_path):
    with RemoteServer(model_path, ARGS, env={"PAGEDLLM_ENABLE_MULTIPROCESSING": "1"}) as server:
        assert server.proc is not None
        assert psutil.Process(server.proc.pid).children(recursive=True)
        line = _ready_line(server.log())
    assert "(engine core in its own process)" in line, line


def test_startup_clock_sums_its_phases():
    clock = StartupClock(start=0.0)
    clock.phases = [("a", 1.0), ("b", 0.5)]
    clock._last = 1.5
    clock.notes["b"] = "why"
    text = clock.summary()
    assert text.startswith("Ready in 1.50 s: a 1.00 s, b 0.50 s (why); heavy modules"), text


def test_freeze_startup_heap_takes_what_is_alive_now_out_of_gc_scans():
    """A server process freezes its start-up heap once started; objects made later stay
    under the collector (and a cycle of them is still collected)."""
    import gc

    from pagedllm.utils import freeze_startup_heap

    class Node:
        pass

    before = Node()
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is before for o in gc.get_objects())  # frozen: out of view
        later = Node()
        later.me = later  # a cycle made after the freeze
        assert any(o is later for o in gc.get_objects())
        del later
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_offline_step_loop_holds_full_collections(tiny_llama):
    """`LLM.generate` runs its step loop with the heap alive at its start frozen and no
    automatic full collection (a full pass would scan torch and the model between two
    device steps), and restores both afterwards; a heap the caller froze stays frozen."""
    import gc

    from pagedllm import LLM, SamplingParams
    from pagedllm.utils import HELD_FULL_COLLECTIONS

    llm = LLM(tiny_llama, device="cpu", skip_tokenizer_init=True, max_model_len=64)
    inner = llm.engine.step
    seen: list[tuple[int, int]] = []

    def step():
        seen.append((gc.get_freeze_count(), gc.get_threshold()[2]))
        return inner()

    llm.engine.step = step
    thresholds = gc.get_threshold()
    params = SamplingParams(max_tokens=3, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    assert seen and all(frozen > 0 and gen2 == HELD_FULL_COLLECTIONS for frozen, gen2 in seen)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    try:
        gc.freeze()
        seen.clear()
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
        assert seen and all(frozen > 0 for frozen, _ in seen)
        assert gc.get_freeze_count() > 0  # the caller's freeze is left in place
        assert gc.get_threshold() == thresholds
    finally:
        gc.unfreeze()
