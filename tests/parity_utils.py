"""Greedy parity with HF transformers for the model-family tests: prompts, the HF reference
and the checks under preemption, chunked prefill and prefix hits (tests/test_*_models.py)."""

from __future__ import annotations

import random
from typing import Any

import torch
from conftest import assert_pool_whole

from pagedllm import LLM, SamplingParams

PROMPT_LENS = [3, 7, 15, 31, 64, 100, 150, 200]
NEW_TOKENS = 32


def make_prompts(vocab: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(10, vocab) for _ in range(n)] for n in PROMPT_LENS]


def hf_model(folder: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(model: Any, prompts: list[list[int]], new_tokens: int = NEW_TOKENS
              ) -> list[list[int]]:
    outs = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new_tokens, do_sample=False)
            outs.append(gen[0, len(p):].tolist())
    return outs


def generate(llm: LLM, prompts: list[list[int]], new_tokens: int = NEW_TOKENS
             ) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
    return [o.outputs[0].token_ids for o in outs]


def check_all_modes(folder: str, prompts: list[list[int]], expected: list[list[int]],
                    prefix_prompts: list[list[int]], prefix_expected: list[list[int]],
                    shared_prefix: int, **llm_kwargs: Any) -> None:
    """Plain batch, preemption, chunked prefill, and prefix-cache hits all equal HF."""
    base: dict[str, Any] = {"device": "cpu", "dtype": "float32", **llm_kwargs}
    llm = LLM(folder, **base)
    assert generate(llm, prompts) == expected
    assert_pool_whole(llm)
    # 40 blocks of 16 tokens hold far less than the batch's ~1,000 tokens.
    llm = LLM(folder, **{**base, "num_gpu_blocks_override": 40, "max_model_len": 256})
    assert generate(llm, prompts) == expected
    assert llm.get_stats()["num_preemptions"] > 0
    assert_pool_whole(llm)
    llm = LLM(folder, **{**base, "max_num_batched_tokens": 24, "max_num_seqs": 4})
    assert generate(llm, prompts) == expected
    assert_pool_whole(llm)
    llm = LLM(folder, **base)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prefix_prompts], params,
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == prefix_expected
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == shared_prefix for o in outs[1:])
    assert_pool_whole(llm)


def reference_case(folder: str, seed: int, shared_prefix: int, model: Any = None) -> tuple:
    """(folder, prompts, HF tokens, shared-prefix prompts, their HF tokens) of one model."""
    model = model if model is not None else hf_model(folder)
    vocab = model.config.vocab_size
    prompts = make_prompts(vocab, seed=seed)
    prefix_prompts = make_prompts(vocab, seed=seed, shared_prefix=shared_prefix)
    return (folder, prompts, hf_greedy(model, prompts), prefix_prompts,
            hf_greedy(model, prefix_prompts))
