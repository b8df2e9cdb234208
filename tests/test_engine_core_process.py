"""The engine core in its own process: faults, disconnects under load, several API servers.

Every server is `pagedllm serve` in a subprocess on 127.0.0.1; waits are on conditions
(a log line, /health, /stats, /metrics values) with generous deadlines.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest
from model_utils import make_tiny_model
from server_utils import RemoteServer

MODEL = "tiny"
NO_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("core_proc_llama"), "llama",
                           initializer_range=0.1)


def _serve(model_path: str, *extra: str) -> RemoteServer:
    """A CPU server whose engine core has a process of its own (on the CPU with one API
    server it would run on a thread unless PAGEDLLM_ENABLE_MULTIPROCESSING=1)."""
    return RemoteServer(model_path, ["--served-model-name", MODEL, "--device", "cpu",
                                     "--max-model-len", "256", "--num-gpu-blocks-override",
                                     "512", "--disable-uvicorn-access-log", *extra],
                        env={"PAGEDLLM_ENABLE_MULTIPROCESSING": "1"})


def _core_pids(server: RemoteServer) -> list[int]:
    return [int(p) for p in re.findall(r"connected to the engine core \(process (\d+)\)",
                                       server.log())]


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout} s")
        time.sleep(0.05)


def test_core_killed_mid_stream_fails_requests_and_health(model_path):
    server = _serve(model_path)
    server.start()
    try:
        (core,) = _core_pids(server)
        os.kill(core, signal.SIGSTOP)  # frozen: the stream below cannot finish by itself
        with httpx.stream("POST", server.url_for("v1/chat/completions"), timeout=120,
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 200,
                                "stream": True, **NO_EOS}) as resp:
            lines = (x for x in resp.iter_lines() if x)
            first = next(lines)  # the role chunk: the request is in flight
            assert '"role":"assistant"' in first
            os.kill(core, signal.SIGKILL)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        assert '"error"' in rest[-2] and '"code":500' in rest[-2], rest[-2:]
        assert "SIGKILL" in rest[-2]
        _wait(lambda: httpx.get(server.url_for("health"), timeout=10).status_code == 503,
              60, "/health answering 503")
        resp = httpx.post(server.url_for("v1/completions"), timeout=60,
                          json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert resp.status_code == 500 and resp.json()["error"]["code"] == 500
        assert "engine" in resp.json()["error"]["message"].lower()
    finally:
        code = server.stop(signal.SIGTERM)
    log = server.log()
    assert "killed by SIGKILL" in log, log[-3000:]
    assert code == 0, log[-3000:]
    assert _gone(core)


def test_sigkill_of_the_server_leaves_no_engine_core(model_path):
    server = _serve(model_path)
    server.start()
    (core,) = _core_pids(server)
    assert not _gone(core)
    server.stop(signal.SIGKILL, kill_leftovers=False)
    try:
        _wait(lambda: _gone(core), 60, "the engine core exiting after its parent was killed")
    finally:
        server.kill_session()


def test_disconnects_under_load_leak_nothing(model_path):
    """500 streams at concurrency 32, 30% of clients leaving mid-stream."""
    with _serve(model_path, "--max-num-seqs", "64") as server:
        client = server.get_async_client()

        async def one(i: int, gate: asyncio.Semaphore) -> tuple[bool, int]:
            async with gate:
                stream = await client.completions.create(
                    model=MODEL, prompt=f"Request number {i}", max_tokens=48, stream=True,
                    extra_body=NO_EOS)
                chunks = 0
                async for chunk in stream:
                    chunks += len(chunk.choices)
                    if i % 10 < 3 and chunks >= 2:  # 30% leave after two chunks
                        await stream.close()
                        return False, chunks
                return True, chunks

        async def run() -> list[tuple[bool, int]]:
            gate = asyncio.Semaphore(32)
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*(one(i, gate) for i in range(500))), timeout=600)
            finally:
                await client.close()

        results = asyncio.run(run())
        assert sum(1 for done, _ in results if not done) == 150
        assert all(chunks >= 1 for done, chunks in results if done)
        stats = server.wait_idle(timeout=60)
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0
        assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
        assert httpx.get(server.url_for("health"), timeout=10).status_code == 200


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_api_servers_share_one_core(model_path):
    with _serve(model_path, "--api-server-count", "2") as server:
        _wait(lambda: len(_core_pids(server)) == 2, 180, "both API servers connecting")
        assert len(set(_core_pids(server))) == 1  # one engine core for both
        client = server.get_async_client()

        async def run() -> list[int]:
            async def one(i: int) -> int:
                out = await client.completions.create(model=MODEL, prompt=f"Hello {i}",
                                                      max_tokens=5, extra_body=NO_EOS)
                return out.usage.completion_tokens

            try:
                return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(24))),
                                              timeout=300)
            finally:
                await client.close()

        assert asyncio.run(run()) == [5] * 24

        def counted() -> bool:  # each server's /metrics shows the whole engine
            texts = [httpx.get(server.url_for("metrics"), timeout=10).text for _ in range(6)]
            return all(_metric(t, "pagedllm:generation_tokens_total") == 24 * 5 and
                       _metric(t, "pagedllm:request_success_total") == 24 for t in texts)

        _wait(counted, 180, "/metrics counting both servers' requests")
        log = server.log()
        assert "Front-end 0 connected" in log and "Front-end 1 connected" in log
    assert "Server stopped." in server.log()


def test_offline_llm_with_the_core_in_its_own_process(model_path, monkeypatch):
    """PAGEDLLM_ENABLE_MULTIPROCESSING=1: the same outputs as in-process (greedy, seeded
    n=2 with logprobs and a stop string), stats through the core, and no core left."""
    from pagedllm import LLM, SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=12, logprobs=2,
                             stop=["a"])]
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("PAGEDLLM_ENABLE_MULTIPROCESSING", mode)
        llm = LLM(model_path, device="cpu", max_model_len=256, num_gpu_blocks_override=64)
        outs = llm.generate(["Hello world", "The cat"], params, use_tqdm=False)
        results[mode] = [[(c.token_ids, c.text, c.finish_reason,
                           [sorted(lp) for lp in c.logprobs or []]) for c in o.outputs]
                         for o in outs]
        stats = llm.get_stats()
        assert stats["num_running"] == 0 and stats["num_free_blocks"] == 64, stats
        if mode == "1":
            core = llm.engine.core.process.pid
            with pytest.raises(AttributeError, match="its own process"):
                llm.engine.scheduler  # noqa: B018
            del llm, outs  # no shutdown(): the engine's finalizer stops the core
            import gc

            gc.collect()
            _wait(lambda pid=core: _gone(pid), 60, "the offline engine core exiting")
    assert results["0"] == results["1"]


def test_bad_multiprocessing_setting_is_refused(model_path, monkeypatch):
    from pagedllm import LLM

    monkeypatch.setenv("PAGEDLLM_ENABLE_MULTIPROCESSING", "yes please")
    with pytest.raises(ValueError, match="PAGEDLLM_ENABLE_MULTIPROCESSING must be 0 or 1"):
        LLM(model_path, device="cpu", max_model_len=256, num_gpu_blocks_override=64)
