"""n > 1: one prefill, the samples forked off it share the prompt's KV blocks by ref count
with a copy-on-write copy of the partial last block; checked through block-pool counts and
against single-sample runs (greedy and seeded)."""

from __future__ import annotations

import random

import pytest
from conftest import assert_pool_whole

from pagedllm import LLM, SamplingParams

PROMPT = [random.Random(0).randrange(10, 340) for _ in range(500)]  # 31 full blocks + 4
PROMPT_BLOCKS = 32


def _blocks_in_use(llm: LLM) -> int:
    pool = llm.engine.scheduler.kv.pool
    return pool.num_blocks - pool.num_free_blocks


@pytest.mark.parametrize("prefix_caching,batched_tokens", [(True, 2048), (False, 2048),
                                                          (True, 96), (False, 96)])
def test_n4_allocates_the_prompt_once(tiny_llama, prefix_caching, batched_tokens):
    llm = LLM(tiny_llama, device="cpu", block_size=16, num_gpu_blocks_override=200,
              enable_prefix_caching=prefix_caching, max_num_batched_tokens=batched_tokens,
              max_num_seqs=8)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=10, ignore_eos=True)
    peak = 0
    engine = llm.engine
    engine.add_request("fork", {"prompt_token_ids": PROMPT}, params)
    while not engine.step():
        peak = max(peak, _blocks_in_use(llm))
    # During the prefill only one sequence exists; after it, 3 copies of the partial block.
    assert peak <= PROMPT_BLOCKS
    assert _blocks_in_use(llm) == PROMPT_BLOCKS + 3
    kv = engine.scheduler.kv
    seqs = [kv.req_blocks[f"fork#{i}"] for i in range(4)]
    for i in range(31):  # the full prompt blocks are shared four ways
        assert len({id(s[i]) for s in seqs}) == 1 and seqs[0][i].ref_cnt == 4
    assert len({s[31].block_id for s in seqs}) == 4  # each sample has its own last block
    assert all(s[31].ref_cnt == 1 for s in seqs)
    results = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results.append(out)
    assert len(results) == 1
    samples = [tuple(o.token_ids) for o in results[0].outputs]
    assert len(samples) == 4 and all(len(s) == 10 for s in samples)
    assert len(set(samples)) == 4  # temperature 1: four different samples
    assert_pool_whole(llm)


def test_forked_samples_see_the_copied_prompt(tiny_llama):
    """Greedy samples of n=4 equal the single greedy sample (a wrong copy of the partial
    block would change them), and seeded samples equal single runs with their seeds."""
    llm = LLM(tiny_llama, device="cpu", block_size=16, enable_prefix_caching=False)
    prompt = {"prompt_token_ids": PROMPT}
    greedy = dict(temperature=0, max_tokens=10, ignore_eos=True)
    single = llm.generate(prompt, SamplingParams(**greedy), use_tqdm=False)[0]
    four = llm.generate(prompt, SamplingParams(n=4, **greedy), use_tqdm=False)[0]
    assert [o.token_ids for o in four.outputs] == [single.outputs[0].token_ids] * 4
    seeded = dict(temperature=1.0, max_tokens=10, ignore_eos=True)
    three = llm.generate(prompt, SamplingParams(n=3, seed=5, **seeded), use_tqdm=False)[0]
    for i, out in enumerate(three.outputs):
        alone = llm.generate(prompt, SamplingParams(seed=5 + i, **seeded), use_tqdm=False)[0]
        assert out.token_ids == alone.outputs[0].token_ids
    assert_pool_whole(llm)


def test_fork_without_free_blocks_falls_back_to_recompute(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", block_size=16, max_model_len=512,
              num_gpu_blocks_override=33)
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    single = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(**greedy),
                          use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("x", {"prompt_token_ids": PROMPT}, SamplingParams(n=4, **greedy))
    while not engine.step():
        pass
    # 32 blocks for the prompt leave one free: one sample gets a copy, two wait to recompute.
    assert [r.request_id for r in engine.scheduler.waiting] == ["x#2", "x#3"]
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert [o.token_ids for o in final.outputs] == [single] * 4
    assert all(o.finish_reason == "length" for o in final.outputs)
    assert_pool_whole(llm)


def test_n_counts_against_max_num_seqs(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", max_num_seqs=4)
    outs = llm.generate(["Hello", "The quick brown fox"],
                        SamplingParams(n=3, temperature=1.0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [3, 3]
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.engine.num_blocks
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.generate("Hello", SamplingParams(n=5), use_tqdm=False)


def test_abort_before_and_after_the_fork(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", max_num_batched_tokens=128, max_num_seqs=8)
    engine = llm.engine
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True)
    engine.add_request("early", {"prompt_token_ids": PROMPT}, params)
    engine.step()  # a first chunk of the prompt only
    final = engine.abort_request("early")
    assert [o.finish_reason for o in final[0].outputs] == ["abort"] * 3
    engine.add_request("late", {"prompt_token_ids": PROMPT}, params)
    while not engine.step():
        pass
    engine.step()
    final = engine.abort_request("late")
    assert [o.finish_reason for o in final[0].outputs] == ["abort"] * 3
    assert all(len(o.token_ids) == 2 for o in final[0].outputs)
    assert not engine.has_unfinished_requests()
    engine.step()  # the block copies queued by the fork are dropped harmlessly
    assert_pool_whole(llm)
