"""On CUDA (Triton backend, CUDA graphs, async scheduling, the fused sampler): grammars hold
a tiny random model's output valid, unconstrained requests in the same batch keep their
greedy tokens, and every KV block comes back (also under preemption and chunking)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).parent.parent))

from test_structured_outputs_engine import (  # noqa: E402
    SMALL,
    _check,
    _constrained,
    _prompts,
    tiny_llama,  # noqa: F401  (the fixture)
)


@pytest.mark.parametrize("small", [False, True])
def test_cuda_constrained_batch(tiny_llama, small):  # noqa: F811
    from conftest import assert_pool_whole

    from pagedllm import LLM, SamplingParams

    kwargs = dict(SMALL) if small else {}
    llm = LLM(tiny_llama, device="cuda", dtype="float32", async_scheduling=True, **kwargs)
    plain = _prompts(6)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(plain, greedy, use_tqdm=False)]
    constrained = _constrained()
    prompts = plain + _prompts(len(constrained), seed=1)
    params = [greedy] * len(plain) + [c[1] for c in constrained]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:len(plain)]] == alone
    for (kind, _), out in zip(constrained, outs[len(plain):]):
        for sample in out.outputs:
            assert sample.finish_reason == "stop", sample
            _check(kind, sample.text)
    assert_pool_whole(llm)
