"""Tensor parallelism on the CPU (gloo): TP=2 gives TP=1's greedy tokens through LLM and the
server (Llama, Qwen2 with q/k/v bias and tied embeddings, Qwen3, one KV head replicated on
both ranks with an odd vocabulary), worker failures end in a RuntimeError instead of a hang, and
no worker process outlives its engine. Argument checks need no processes."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TINY, assert_pool_whole
from model_utils import make_tiny_model

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs

NEW_TOKENS = 16
PROMPT_LENS = [3, 9, 17, 40, 70]
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tiny_model_factory, tmp_path_factory) -> dict[str, str]:
    return {
        "llama": tiny_model_factory("llama"),
        "qwen2": tiny_model_factory("qwen2"),  # q/k/v bias, tied embeddings
        "qwen3": tiny_model_factory("qwen3"),  # per-head q/k RMSNorm (replicated weights)
        # One KV head for two ranks (replicated), and a vocabulary that does not split evenly.
        "llama_kv1": make_tiny_model(tmp_path_factory.mktemp("llama_kv1"), "llama",
                                     vocab_size=397, **{**TINY, "num_key_value_heads": 1}),
    }


def _prompts(folder: str) -> list[dict[str, Any]]:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    rng = random.Random(len(folder))
    return [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(n)]}
            for n in PROMPT_LENS]


def _tokens(llm: LLM, prompts: list[Any], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(models) -> dict[str, list[list[int]]]:
    """TP=1 greedy tokens of each model (one process)."""
    out = {}
    for name, folder in models.items():
        llm = LLM(folder, device="cpu", dtype="float32")
        out[name] = _tokens(llm, _prompts(folder))
        del llm
    return out


def _gone(pids: list[int], timeout: float = 60.0) -> bool:
    """True once none of `pids` runs any more (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ")[-1][:1] != "Z":
                        alive.append(pid)
            except FileNotFoundError:
                pass
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.1)


@contextlib.contextmanager
def tp_llm(folder: str, **kwargs: Any) -> Iterator[LLM]:
    """A TP=2 LLM on the CPU, shut down on exit; asserts its workers are gone afterwards."""
    llm = LLM(folder, device="cpu", dtype="float32", tensor_parallel_size=2, **kwargs)
    pids = llm.engine.executor.worker_pids()
    assert len(pids) == 1
    try:
        yield llm
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
        assert _gone(pids), f"worker processes {pids} outlived their engine"


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_tp2_greedy_matches_tp1(models, reference, name):
    with tp_llm(models[name]) as llm:
        assert llm.engine.executor.backend_name == "mp"  # the default for TP > 1
        assert _tokens(llm, _prompts(models[name])) == reference[name]
        assert_pool_whole(llm)
        # One process group per process: a second TP engine is refused, the first goes on.
        with pytest.raises(RuntimeError, match="only one tensor-parallel engine"):
            LLM(models[name], device="cpu", dtype="float32", tensor_parallel_size=2)
        assert _tokens(llm, _prompts(models[name])[:1]) == reference[name][:1]


def test_tp2_replicated_kv_head_with_chunking_and_preemption(models, reference):
    """One KV head on two ranks; small token budget (chunked prefill) and few blocks
    (preemption): the driver's scheduling changes, the workers follow it."""
    folder = models["llama_kv1"]
    with tp_llm(folder, max_num_batched_tokens=24, max_num_seqs=4, num_gpu_blocks_override=16,
                max_model_len=128, block_size=8) as llm:
        assert llm.engine.executor.runner.kv_heads_per_rank() == 1
        assert _tokens(llm, _prompts(folder)) == reference["llama_kv1"]
        assert llm.engine.get_stats()["num_preemptions"] > 0
        assert_pool_whole(llm)


def test_tp2_async_scheduling_matches_tp1(models, reference):
    """Async scheduling over two ranks: a pending token's id reaches the worker as rank 0's
    sampled ids, broadcast over the group, never through the host. Under chunked prefill and
    preemption, and mixed with steps that run synchronously (a logprobs request, a seeded
    random one), TP=2 gives TP=1's tokens."""
    folder = models["llama_kv1"]
    limits = dict(max_num_batched_tokens=24, max_num_seqs=4, num_gpu_blocks_override=16,
                  max_model_len=128, block_size=8)
    with tp_llm(folder, async_scheduling=True, **limits) as llm:
        assert llm.engine.config.scheduler.async_scheduling
        assert _tokens(llm, _prompts(folder)) == reference["llama_kv1"]
        assert llm.engine.get_stats()["num_preemptions"] > 0
        mixed = [GREEDY, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                        logprobs=2),
                 SamplingParams(temperature=0.8, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True),
                 GREEDY, GREEDY]
        got = [o.outputs[0].token_ids
               for o in llm.generate(_prompts(folder), mixed, use_tqdm=False)]
        assert_pool_whole(llm)
    one = LLM(folder, device="cpu", dtype="float32", async_scheduling=False, **limits)
    assert got == [o.outputs[0].token_ids
                   for o in one.generate(_prompts(folder), mixed, use_tqdm=False)]


def test_tp2_logprobs_prompt_logprobs_and_forks_match_tp1(models):
    """The extra LM-head calls of prompt logprobs happen on every rank, and n > 1 forks copy
    KV blocks on every rank."""
    folder = models["llama"]
    prompts = _prompts(folder)[1:4]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2, n=2)
    one = LLM(folder, device="cpu", dtype="float32", max_num_batched_tokens=32, max_num_seqs=8)
    expected = one.generate(prompts, params, use_tqdm=False)
    del one
    with tp_llm(folder, max_num_batched_tokens=32, max_num_seqs=8) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
    for g, e in zip(got, expected):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in e.outputs]
        assert len(g.outputs) == 2
        for gc_, ec in zip(g.outputs, e.outputs):
            for g_pos, e_pos in zip(gc_.logprobs, ec.logprobs):
                assert g_pos.keys() == e_pos.keys()
                for tok in g_pos:
                    assert g_pos[tok].logprob == pytest.approx(e_pos[tok].logprob, abs=1e-4)
        assert len(g.prompt_logprobs) == len(e.prompt_logprobs) > 1
        for g_pos, e_pos in zip(g.prompt_logprobs[1:], e.prompt_logprobs[1:]):
            assert g_pos.keys() == e_pos.keys()
            for tok in g_pos:
                assert g_pos[tok].logprob == pytest.approx(e_pos[tok].logprob, abs=1e-4)


def test_tp2_server_matches_tp1(models):
    """`pagedllm serve --tensor-parallel-size 2` through the official openai client; the
    server stops cleanly (exit 0) and takes its worker with it."""
    from server_utils import RemoteServer

    folder = models["llama"]
    one = LLM(folder, device="cpu", dtype="float32")
    prompt = "Hello, my name is"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want_text = one.generate(prompt, SamplingParams(temperature=0, max_tokens=12),
                             use_tqdm=False)[0].outputs[0].text
    want_chat = one.chat(messages, SamplingParams(temperature=0, max_tokens=12),
                         use_tqdm=False)[0].outputs[0].text
    del one
    server = RemoteServer(folder, ["--device", "cpu", "--dtype", "float32",
                                   "--tensor-parallel-size", "2", "--served-model-name", "tiny"])
    server.start()
    try:
        client = server.get_client()
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                        temperature=0)
        stream = client.chat.completions.create(model="tiny", messages=messages,
                                                max_tokens=12, temperature=0, stream=True)
        chat = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        server_pid = server.proc.pid
        workers = [int(p) for p in open(f"/proc/{server_pid}/task/{server_pid}/children")
                   .read().split()]
        server.stop(kill_leftovers=False)  # the server itself must stop its workers
        stopped = _gone(workers)
    finally:
        server.stop()
    assert got.choices[0].text == want_text
    assert chat == want_chat
    assert server.returncode == 0
    assert workers and stopped


def test_workers_stop_when_the_llm_is_dropped_or_the_process_exits(models, tmp_path):
    llm = LLM(models["llama"], device="cpu", dtype="float32", tensor_parallel_size=2)
    pids = llm.engine.executor.worker_pids()
    del llm  # no shutdown(): the executor's finalizer stops the workers
    gc.collect()
    assert _gone(pids)
    script = tmp_path / "exit_without_shutdown.py"
    script.write_text(
        "from pagedllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({models['llama']!r}, device='cpu', tensor_parallel_size=2)\n"
        "    print('WORKERS', *llm.engine.executor.worker_pids(), flush=True)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr
    pids = [int(p) for p in run.stdout.split("WORKERS")[1].split()]
    assert pids and _gone(pids)


# ---------------------------------------------------------------- failures
def _generate_with_timeout(llm: LLM, timeout: float = 120.0) -> BaseException | None:
    """Run a long generation in a thread; the error it ended with (the test fails on a hang)."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2,
                         SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                         use_tqdm=False)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "generation hung after a worker failure"
    return result[0]


def test_worker_killed_mid_run_is_a_clear_error(models):
    with tp_llm(models["llama"]) as llm:
        executor = llm.engine.executor
        pid = executor.worker_pids()[0]
        broadcast = executor._broadcast_step
        steps = []

        def kill_on_third_step(step):
            steps.append(step)
            if len(steps) == 3:
                os.kill(pid, signal.SIGKILL)
            broadcast(step)

        executor._broadcast_step = kill_on_third_step
        error = _generate_with_timeout(llm)
        assert isinstance(error, RuntimeError), error
        assert "rank 1" in str(error) and "died" in str(error)
        assert len(steps) == 3
        with pytest.raises(RuntimeError, match="tensor-parallel engine has failed"):
            llm.generate("Hello", GREEDY, use_tqdm=False)
        assert _gone([pid])


def test_worker_exception_is_reported_with_its_traceback(models):
    with tp_llm(models["llama"]) as llm:
        # A step the worker cannot run: it reports its traceback and exits.
        llm.engine.executor._send("execute_step", (None,), reply=False)
        error = _generate_with_timeout(llm)
        assert isinstance(error, RuntimeError), error
        assert "rank 1 raised in execute_step" in str(error)
        assert "AttributeError" in str(error)


# ---------------------------------------------------------------- argument checks
def _config(folder: str, **kwargs: Any):
    return EngineArgs(model=folder, device="cpu", **kwargs).create_engine_config()


def test_tensor_parallel_size_must_fit_the_model(models, tmp_path):
    folder = models["llama"]  # 4 attention heads, 2 KV heads, intermediate 128
    with pytest.raises(ValueError, match=r"must divide num_attention_heads=4.*fit this model: "
                                         r"1, 2, 4"):
        _config(folder, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        _config(folder, tensor_parallel_size=8)
    # 4 ranks on 2 KV heads: each KV head is replicated on two ranks.
    assert _config(folder, tensor_parallel_size=4).parallel.distributed_executor_backend == "mp"
    assert _config(folder).parallel.distributed_executor_backend is None
    with pytest.raises(ValueError, match="intermediate_size=130"):
        _config(make_tiny_model(tmp_path, "llama", **{**TINY, "intermediate_size": 130}),
                tensor_parallel_size=4)


def test_unknown_backend_and_missing_ray_and_pooling(models, monkeypatch):
    folder = models["llama"]
    with pytest.raises(ValueError, match="'mp' or 'ray'"):
        _config(folder, tensor_parallel_size=2, distributed_executor_backend="mpi")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'pagedllm\[ray\]'"):
        _config(folder, tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="text generation only"):
        _config(folder, tensor_parallel_size=2, runner="pooling")


def test_more_ranks_than_gpus_is_refused(models, monkeypatch):
    import torch

    from pagedllm.distributed.checks import resolve_tensor_parallel

    model = _config(models["llama"]).model
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 GPUs, but this machine has 1"):
        resolve_tensor_parallel(model, 2, None, "cuda")
    assert resolve_tensor_parallel(model, 2, "ray", "cuda") == "ray"  # GPUs of other nodes


# ---------------------------------------------------------------- Ray
def test_ray_tp2_matches_tp1_and_fails_clearly(models, reference):
    """A local Ray cluster (started and stopped here): TP=2 over a placement group of two
    CPU bundles gives TP=1's tokens; a killed actor ends in a RuntimeError."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install "
                                            "'pagedllm[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        folder = models["llama"]
        with tp_llm(folder, distributed_executor_backend="ray") as llm:
            assert llm.engine.executor.backend_name == "ray"
            assert _tokens(llm, _prompts(folder)) == reference["llama"]
            os.kill(llm.engine.executor.worker_pids()[0], signal.SIGKILL)
            error = _generate_with_timeout(llm)
            assert isinstance(error, RuntimeError), error
            assert "rank 1" in str(error)
        assert ray.util.placement_group_table() and all(
            pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    finally:
        ray.shutdown()
