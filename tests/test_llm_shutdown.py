"""An engine shut down refuses more work with a clear error instead of an obscure one (its
model runner, with the weights and KV cache, is dropped at shutdown)."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams


def test_generate_after_shutdown_is_a_clear_error(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    prompt = [{"prompt_token_ids": [5, 6, 7]}]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    assert len(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids) == 3
    llm.engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(prompt, params, use_tqdm=False)
