"""Greedy parity with HF transformers on tiny random Llama / Qwen2 / Qwen3 / Mistral models,
also under preemption, chunked prefill and prefix caching."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_pool_whole

from pagedllm import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
PROMPT_LENS = [3, 7, 15, 31, 64, 100, 150, 200]
NEW_TOKENS = 32


def _prompts(vocab: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(10, vocab) for _ in range(n)] for n in PROMPT_LENS]


def _hf_greedy(folder: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
            outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def reference(tiny_model_factory):
    cache: dict[tuple[str, int], tuple[list[list[int]], list[list[int]]]] = {}

    def get(arch: str, shared_prefix: int = 0):
        key = (arch, shared_prefix)
        if key not in cache:
            from transformers import AutoConfig

            folder = tiny_model_factory(arch)
            vocab = AutoConfig.from_pretrained(folder).vocab_size
            prompts = _prompts(vocab, seed=len(arch), shared_prefix=shared_prefix)
            cache[key] = (prompts, _hf_greedy(folder, prompts))
        return cache[key]

    return get


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(arch, tiny_model_factory, reference):
    prompts, expected = reference(arch)
    llm = LLM(tiny_model_factory(arch), device="cpu", dtype="float32")
    assert _generate(llm, prompts) == expected
    assert_pool_whole(llm)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_parity_under_preemption(arch, tiny_model_factory, reference):
    prompts, expected = reference(arch)
    # 40 blocks of 16 tokens hold far less than the batch's ~1,000 tokens.
    llm = LLM(tiny_model_factory(arch), device="cpu", num_gpu_blocks_override=40,
              max_model_len=256)
    assert _generate(llm, prompts) == expected
    assert llm.get_stats()["num_preemptions"] > 0
    assert_pool_whole(llm)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_parity_with_chunked_prefill(arch, tiny_model_factory, reference):
    prompts, expected = reference(arch)
    llm = LLM(tiny_model_factory(arch), device="cpu", max_num_batched_tokens=24,
              max_num_seqs=4)
    assert _generate(llm, prompts) == expected
    assert_pool_whole(llm)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_parity_with_shared_prefix(arch, tiny_model_factory, reference):
    prompts, expected = reference(arch, shared_prefix=96)
    llm = LLM(tiny_model_factory(arch), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # The first request computes the 96-token prefix (6 blocks); the others reuse it.
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == 96 for o in outs[1:])
    # A second round hits the cache for whole prompts (all but the last partial block).
    again = llm.generate([{"prompt_token_ids": prompts[-1]}], params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == expected[-1]
    assert again.num_cached_tokens == (len(prompts[-1]) - 1) // 16 * 16
    assert_pool_whole(llm)


def test_parity_small_blocks_and_prefix_and_preemption(tiny_model_factory, reference):
    """All mechanisms at once: preemption + chunking + prefix hits, block size 8."""
    prompts, expected = reference("llama", shared_prefix=96)
    llm = LLM(tiny_model_factory("llama"), device="cpu", block_size=8,
              num_gpu_blocks_override=80, max_model_len=400, max_num_batched_tokens=64,
              max_num_seqs=8)
    assert _generate(llm, prompts) == expected
    assert_pool_whole(llm)
