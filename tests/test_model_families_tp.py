"""Tensor parallelism (TP=2, gloo on the CPU) for the new families: MoE experts sharded over
their FFN dimension (one all-reduce per layer, the shared expert's partial sum included),
Gemma's per-layer windows and Phi-3's fused checkpoint tensors give TP=1's greedy tokens."""

from __future__ import annotations

import random

import pytest
from conftest import TINY, assert_pool_whole
from model_utils import make_tiny_model
from test_gemma_models import GEMMA_MODELS
from test_moe_models import MOE_MODELS
from test_phi3 import PHI3
from test_tensor_parallel import tp_llm

from pagedllm import LLM, SamplingParams

CASES = {
    "mixtral-top2": MOE_MODELS["mixtral-top2"],
    "qwen2_moe-top1": MOE_MODELS["qwen2_moe-top1"],
    "qwen3_moe-top8": MOE_MODELS["qwen3_moe-top8"],
    "gemma3": GEMMA_MODELS["gemma3"],
    "phi3": ("phi3", PHI3),
}
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_matches_tp1(name, tmp_path):
    model_type, overrides = CASES[name]
    folder = make_tiny_model(tmp_path, model_type, **{**TINY, **overrides})
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 300) for _ in range(n)]}
               for n in (3, 20, 70, 150)]
    kwargs = dict(max_model_len=256)
    ref = [o.outputs[0].token_ids for o in LLM(folder, device="cpu", dtype="float32",
                                               **kwargs).generate(prompts, GREEDY,
                                                                  use_tqdm=False)]
    with tp_llm(folder, **kwargs) as llm:
        runner = llm.engine.executor.runner
        if name.startswith(("mixtral", "qwen")):
            experts = runner.model.layers[0].mlp.experts
            full = overrides.get("moe_intermediate_size") or overrides["intermediate_size"]
            assert experts.w2_weight.shape[2] * 2 == full  # this rank's half of the FFN dim
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert out == ref
        assert_pool_whole(llm)
