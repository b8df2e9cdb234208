"""On CUDA (Triton backend, CUDA graphs): logprobs and prompt logprobs against HF's fp32
log-softmax, and n > 1 forks whose copy-on-write block copies run on the device."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).parent.parent))

TOL = 1e-4
PROMPT = [random.Random(0).randrange(10, 300) for _ in range(500)]  # 31 full blocks + 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from model_utils import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", hidden_size=128,
                           intermediate_size=256, max_position_embeddings=1024,
                           initializer_range=0.1)


@pytest.fixture(scope="module")
def llm(folder):
    from pagedllm import LLM

    return LLM(folder, device="cuda", dtype="float32", max_num_batched_tokens=256,
               block_size=16)


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def test_logprobs_and_prompt_logprobs_match_hf(llm, hf):
    from pagedllm import SamplingParams

    prompt = PROMPT[:300]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=16, logprobs=4,
                                      prompt_logprobs=2, ignore_eos=True), use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    ref = _hf_logprobs(hf, prompt + tokens)
    for i, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[len(prompt) + i - 1]
        assert abs(entry[token].logprob - row[token].item()) < TOL
        top = row.topk(4)
        for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(entry[tid].logprob - lp) < TOL
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        got = out.prompt_logprobs[pos][prompt[pos]].logprob
        assert abs(got - ref[pos - 1, prompt[pos]].item()) < TOL


def test_forks_copy_the_partial_block_on_the_device(llm):
    from pagedllm import SamplingParams

    prompt = {"prompt_token_ids": PROMPT}
    greedy = dict(temperature=0, max_tokens=32, ignore_eos=True)
    single = llm.generate(prompt, SamplingParams(**greedy), use_tqdm=False)[0].outputs[0]
    four = llm.generate(prompt, SamplingParams(n=4, **greedy), use_tqdm=False)[0]
    assert [o.token_ids for o in four.outputs] == [single.token_ids] * 4
    seeded = dict(temperature=1.0, max_tokens=32, ignore_eos=True)
    three = llm.generate(prompt, SamplingParams(n=3, seed=9, **seeded), use_tqdm=False)[0]
    for i, out in enumerate(three.outputs):
        alone = llm.generate(prompt, SamplingParams(seed=9 + i, **seeded), use_tqdm=False)[0]
        assert out.token_ids == alone.outputs[0].token_ids
    assert len({tuple(o.token_ids) for o in three.outputs}) == 3
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
