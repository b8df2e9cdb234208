"""Speculative decoding with structured outputs, on a tiny random Llama over the default
model's real tokenizer: drafts are cut to the prefix the grammar accepts, every verified
position is masked by its own bitmask row, so greedy constrained output equals
non-speculative constrained output, for both grammar backends."""

from __future__ import annotations

import json
import re

import pytest
from conftest import assert_pool_whole
from test_structured_outputs_engine import SCHEMA, _prompts
from test_structured_outputs_engine import tiny_llama as tiny_smol  # noqa: F401

from pagedllm import LLM, SamplingParams, StructuredOutputsParams

REPEAT = r"(ab1 ){3,30}"
# SmolLM2 ids of "a", "b", "ab", "1", " " (216), "x", "c"
ALLOWED = [81, 82, 369, 33, 216, 104, 83]


def _params(so: StructuredOutputsParams, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=60, structured_outputs=so, **kw)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_constrained_greedy_equals_non_speculative(tiny_smol, backend):  # noqa: F811
    so = StructuredOutputsParams
    cases = [_params(so(regex=REPEAT)), _params(so(json=SCHEMA, disable_any_whitespace=True)),
             _params(so(choice=["alpha beta alpha beta", "gamma"])),
             SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    prompts = _prompts(len(cases))
    common = dict(device="cpu", structured_outputs_config={"backend": backend})
    plain = LLM(tiny_smol, **common).generate(prompts, cases, use_tqdm=False)
    for config in ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
                   {"model": tiny_smol, "num_speculative_tokens": 3}):
        llm = LLM(tiny_smol, **common, speculative_config=config)
        outs = llm.generate(prompts, cases, use_tqdm=False)
        for a, b in zip(plain, outs):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids
            assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
        assert re.fullmatch(REPEAT, outs[0].outputs[0].text)
        json.loads(outs[1].outputs[0].text)
        stats = llm.engine.core.stats._current
        assert stats.spec_num_accepted_tokens > 0, config
        assert_pool_whole(llm)


def test_drafts_the_grammar_refuses_are_never_verified(tiny_smol):  # noqa: F811
    """The target drafting for itself proposes its unconstrained choices; the scheduler cuts
    them where the grammar refuses, so whatever is verified is grammar-valid."""
    so = StructuredOutputsParams(regex=REPEAT)
    llm = LLM(tiny_smol, device="cpu",
              speculative_config={"model": tiny_smol, "num_speculative_tokens": 3})
    engine = llm.engine
    # The draft sees allowed_token_ids (a logits processor), not the grammar: its
    # proposals mix the grammar's tokens and refused ones ("x", "c").
    engine.add_request("r", _prompts(1)[0], _params(so, allowed_token_ids=ALLOWED))
    verified: list[list[int]] = []
    core = engine.core
    schedule = core.scheduler.schedule

    def spy():
        out = schedule()
        verified.extend(out.scheduled_draft_tokens.values())
        return out

    core.scheduler.schedule = spy
    while engine.has_unfinished_requests():
        engine.step()
    req_text = []
    tok = engine.tokenizer
    for drafts in verified:
        req_text.append(tok.decode(drafts))
    # Every verified run continues the ab1 pattern (the grammar's only choice).
    assert verified
    assert all(set(t) <= set("ab1 ") for t in req_text), req_text
    assert_pool_whole(llm)


def test_sampled_constrained_distribution_matches_non_speculative(tiny_smol):  # noqa: F811
    """Sampled constrained output draws from the same distribution with a sampled draft
    model (the target itself, seeing allowed_token_ids but not the grammar: its choices
    are often refused by the grammar and must be rejected, not cut) as without
    speculation: chi-square of per-position characters over many seeds."""
    import numpy as np
    from scipy.stats import chi2_contingency

    so = StructuredOutputsParams(regex="[ab]{8}")
    num = 400
    prompt = _prompts(1)[0]

    def cells(llm: LLM) -> np.ndarray:
        allowed = ALLOWED + [llm.get_tokenizer().eos_token_id]  # the grammar's end
        params = [SamplingParams(temperature=1.0, max_tokens=12, seed=100 + i,
                                 structured_outputs=so, allowed_token_ids=allowed)
                  for i in range(num)]
        texts = [o.outputs[0].text for o in llm.generate([prompt] * num, params,
                                                          use_tqdm=False)]
        assert all(re.fullmatch("[ab]{8}", t) for t in texts), texts[:5]
        return np.array([[sum(t[j] == c for t in texts) for c in "ab"] for j in range(8)]
                        ).ravel()

    base = cells(LLM(tiny_smol, device="cpu"))
    llm = LLM(tiny_smol, device="cpu",
              speculative_config={"model": tiny_smol, "num_speculative_tokens": 3})
    spec = cells(llm)
    stats = llm.engine.core.stats._current
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    _, p, _, _ = chi2_contingency(np.stack([base, spec]) + 0.5)
    assert p > 1e-3, p
