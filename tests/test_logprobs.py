"""Sample logprobs and prompt logprobs against HF transformers' log-softmax (fp32), their
vLLM shape (rank, decoded token, top-k), logprobs modes, cumulative logprob and best_of."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import assert_pool_whole

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import RequestOutputKind

TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_llama):
    # Small steps and blocks: prompts are prefilled in chunks over several steps.
    return LLM(tiny_llama, device="cpu", block_size=16, max_num_batched_tokens=32,
               max_num_seqs=8)


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is HF's log-softmax predicting token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 340) for _ in range(n)]


def _check_row(entry: dict, token: int, ref: torch.Tensor, k: int) -> None:
    """One position's dict: own token first with its rank, then the top-k of HF's row."""
    assert next(iter(entry)) == token
    assert abs(entry[token].logprob - ref[token].item()) < TOL
    assert entry[token].rank == int((ref >= ref[token]).sum())
    top = ref.topk(k)
    assert set(top.indices.tolist()) <= set(entry)
    assert len(entry) in (k, k + 1)
    for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
        assert abs(entry[tid].logprob - lp) < TOL
    assert all(isinstance(e.decoded_token, str) for e in entry.values())


def test_greedy_logprobs_match_hf(llm, hf):
    prompt = _prompt(40)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=12, logprobs=5,
                                      ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 12
    ref = _hf_logprobs(hf, prompt + out.token_ids)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) + i - 1]
        assert token == int(row.argmax())
        assert entry[token].rank == 1
        _check_row(entry, token, row, 5)
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)), abs=1e-4)


@pytest.mark.parametrize("prompt_len", [1, 2, 17, 100])
def test_prompt_logprobs_match_hf_with_chunked_prefill(llm, hf, prompt_len):
    prompt = _prompt(prompt_len, seed=prompt_len)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3,
                                      ignore_eos=True), use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == prompt_len and plp[0] is None
    ref = _hf_logprobs(hf, prompt)
    for pos in range(1, prompt_len):
        _check_row(plp[pos], prompt[pos], ref[pos - 1], 3)
    assert out.outputs[0].logprobs is None  # not asked for
    assert out.outputs[0].cumulative_logprob is None


def test_prompt_logprobs_bypass_prefix_cache_hits(llm, hf):
    prompt = _prompt(70, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)
    again = llm.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)[0]
    assert again.num_cached_tokens == 64  # the cache holds the prompt's 4 full blocks
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    ref = _hf_logprobs(hf, prompt)
    assert len(out.prompt_logprobs) == 70
    for pos in range(1, 70):
        entry = out.prompt_logprobs[pos]
        assert list(entry) == [prompt[pos]]  # prompt_logprobs=0: only the prompt token
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < TOL
    assert again.outputs[0].token_ids == out.outputs[0].token_ids
    assert_pool_whole(llm)


def test_logprobs_of_a_mixed_batch(llm, hf):
    """Rows with and without logprobs, different k, greedy and seeded sampling together."""
    prompts = [_prompt(n, seed=n) for n in (5, 9, 30)]
    params = [
        SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, max_tokens=6, logprobs=0, ignore_eos=True),
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert outs[1].outputs[0].logprobs is None
    for prompt, out, temp, k in ((prompts[0], outs[0], 1.0, 2), (prompts[2], outs[2], 0.7, 0)):
        o = out.outputs[0]
        ref = _hf_logprobs(hf, prompt + o.token_ids)
        for i, (token, entry) in enumerate(zip(o.token_ids, o.logprobs)):
            # Processed logprobs: the distribution sampled from (temperature applied).
            row = torch.log_softmax(
                torch.log_softmax(ref[len(prompt) + i - 1], -1) / temp, -1)
            _check_row(entry, token, row, k)


def test_processed_logprobs_mask_top_k(llm, hf):
    prompt = _prompt(12, seed=1)
    o = llm.generate({"prompt_token_ids": prompt},
                     SamplingParams(temperature=1.0, top_k=3, seed=0, max_tokens=5, logprobs=6,
                                    ignore_eos=True), use_tqdm=False)[0].outputs[0]
    for entry in o.logprobs:
        finite = [e for e in entry.values() if math.isfinite(e.logprob)]
        assert len(finite) == 3  # only the top 3 can be sampled
        assert sum(math.exp(e.logprob) for e in finite) == pytest.approx(1.0, abs=1e-5)
        assert len(entry) == 6


def test_raw_logprobs_mode(tiny_llama, hf):
    llm = LLM(tiny_llama, device="cpu", logprobs_mode="raw_logprobs")
    prompt = _prompt(12, seed=2)
    o = llm.generate({"prompt_token_ids": prompt},
                     SamplingParams(temperature=0.5, top_k=3, seed=0, max_tokens=5, logprobs=4,
                                    presence_penalty=1.0, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    ref = _hf_logprobs(hf, prompt + o.token_ids)
    for i, (token, entry) in enumerate(zip(o.token_ids, o.logprobs)):
        _check_row(entry, token, ref[len(prompt) + i - 1], 4)  # untouched by sampling knobs
    with pytest.raises(ValueError, match="logprobs_mode"):
        LLM(tiny_llama, device="cpu", logprobs_mode="softmax")


def test_whole_vocabulary_logprobs(tiny_llama, hf):
    llm = LLM(tiny_llama, device="cpu", max_logprobs=1000)
    prompt = _prompt(8, seed=5)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=2, logprobs=-1,
                                      prompt_logprobs=-1, ignore_eos=True), use_tqdm=False)[0]
    vocab = hf.config.vocab_size
    ref = _hf_logprobs(hf, prompt + out.outputs[0].token_ids)
    for i, entry in enumerate(out.outputs[0].logprobs):
        assert len(entry) == vocab
        assert sorted(e.rank for e in entry.values()) == list(range(1, vocab + 1))
        _check_row(entry, out.outputs[0].token_ids[i], ref[len(prompt) + i - 1], vocab)
    assert all(len(step) == vocab for step in out.prompt_logprobs[1:])


def test_delta_outputs_carry_each_logprob_once(llm):
    from pagedllm.engine.llm_engine import LLMEngine

    engine: LLMEngine = llm.engine
    prompt = _prompt(20, seed=3)
    params = SamplingParams(temperature=0, max_tokens=7, logprobs=1, prompt_logprobs=1,
                            ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta", {"prompt_token_ids": prompt}, params)
    tokens, logprobs, prompt_lps = [], [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
            logprobs += out.outputs[0].logprobs
            if out.prompt_logprobs is not None:
                prompt_lps.append(out.prompt_logprobs)
    full = llm.generate({"prompt_token_ids": prompt},
                        SamplingParams(temperature=0, max_tokens=7, logprobs=1,
                                       prompt_logprobs=1, ignore_eos=True),
                        use_tqdm=False)[0]
    assert tokens == full.outputs[0].token_ids
    assert [list(e) for e in logprobs] == [list(e) for e in full.outputs[0].logprobs]
    assert len(prompt_lps) == 1 and len(prompt_lps[0]) == 20


def test_best_of_returns_the_most_likely_samples(llm):
    prompt = {"prompt_token_ids": _prompt(21, seed=4)}
    common = dict(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    four = llm.generate(prompt, SamplingParams(n=4, logprobs=0, **common),
                        use_tqdm=False)[0].outputs
    best = llm.generate(prompt, SamplingParams(n=2, best_of=4, **common), use_tqdm=False)[0]
    assert [o.index for o in best.outputs] == [0, 1]
    ranked = sorted(four, key=lambda o: o.cumulative_logprob, reverse=True)
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked[:2]]
    for got, want in zip(best.outputs, ranked):
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-5)
        assert got.logprobs is None  # only ranked, not asked for
    assert len({tuple(o.token_ids) for o in four}) == 4
    assert_pool_whole(llm)
