"""Async scheduling (step N+1 scheduled before step N's tokens reach the host) gives exactly
the outputs of synchronous scheduling, and leaks nothing.

On the CPU the launched step runs synchronously, but every piece of the async bookkeeping
runs: pending tokens, inputs taken from the previous step's sampled ids, late stops,
preemption of a request whose token is pending, and requests with logprobs or logits
processors (whose steps collect the one in flight before their logits pipeline).
"""

from __future__ import annotations

import random

import pytest
from conftest import assert_pool_whole

from pagedllm import LLM, SamplingParams


def _prompts(vocab: int, n: int = 10, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    shared = [rng.randrange(1, vocab) for _ in range(40)]
    prompts = []
    for i in range(n):
        tail = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 60))]
        prompts.append({"prompt_token_ids": (shared if i % 3 == 0 else []) + tail})
    return prompts


def _run(folder: str, prompts, params, **kwargs):
    llm = LLM(folder, device="cpu", **kwargs)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_pool_whole(llm)
    return llm, [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_async_equals_sync_under_preemption_and_chunking(tiny_model_factory, arch):
    folder = tiny_model_factory(arch)
    prompts = _prompts(300)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    small = dict(num_gpu_blocks_override=14, max_num_batched_tokens=32, max_num_seqs=8,
                 max_model_len=160)
    _, sync = _run(folder, prompts, params, async_scheduling=False, **small)
    llm, overlapped = _run(folder, prompts, params, async_scheduling=True, **small)
    assert overlapped == sync
    assert llm.engine.scheduler.num_preemptions > 0, "the KV cache was meant to run out"
    assert llm.engine.config.scheduler.async_scheduling


def test_late_stops_and_mixed_requests(tiny_model_factory):
    """Stop tokens and stop strings found one step late, max_tokens reached while a token is
    pending, and requests that need synchronous steps (logprobs, penalties, seeds) in the
    same batch as plain ones: all as in synchronous scheduling."""
    folder = tiny_model_factory("llama")
    prompts = _prompts(300, n=8, seed=1)
    _, greedy = _run(folder, prompts, SamplingParams(temperature=0, max_tokens=16,
                                                     ignore_eos=True), async_scheduling=False)
    stop_ids = sorted({tokens[5] for tokens, _ in greedy[:4]})
    params = []
    for i in range(len(prompts)):
        kinds = [
            SamplingParams(temperature=0, max_tokens=16, stop_token_ids=stop_ids),
            SamplingParams(temperature=0, max_tokens=3 + i),
            SamplingParams(temperature=0, max_tokens=12, logprobs=2),
            SamplingParams(temperature=0.8, max_tokens=12, seed=i, presence_penalty=0.5),
            SamplingParams(temperature=1.0, max_tokens=12, seed=100 + i),
        ]
        params.append(kinds[i % len(kinds)])
    _, sync = _run(folder, prompts, params, async_scheduling=False)
    _, overlapped = _run(folder, prompts, params, async_scheduling=True)
    assert overlapped == sync
    assert any(reason == "stop" for _, reason in sync), "no stop token was hit"


def test_abort_while_a_step_is_in_flight(tiny_model_factory):
    folder = tiny_model_factory("llama")
    llm = LLM(folder, device="cpu", async_scheduling=True)
    engine = llm.engine
    for i, prompt in enumerate(_prompts(300, n=4, seed=2)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.core._in_flight is not None, "a plain step should be in flight"
    finals = engine.abort_request(["0", "2"])
    assert {f.request_id for f in finals} == {"0", "2"}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id in {"1", "3"}
    assert engine.core._in_flight is None
    assert_pool_whole(llm)


def test_async_scheduling_is_off_by_default_on_cpu(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), device="cpu")
    assert not llm.engine.config.scheduler.async_scheduling
