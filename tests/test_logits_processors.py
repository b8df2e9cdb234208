"""Penalties, logit_bias, allowed_token_ids and min_tokens against a plain reference, and
repetition_penalty greedy parity with HF transformers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.worker.logits_processors import (
    apply_logits_processors,
    bad_words_token_ids,
    banned_tokens,
)


def _req(params: SamplingParams, prompt: list[int], output: list[int], eos: int = 0):
    return SimpleNamespace(sampling_params=params, all_token_ids=prompt + output,
                           output_token_ids=output, num_output_tokens=len(output),
                           eos_token_id=eos)


def test_penalties_and_bias_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5,
                       logit_bias={7: 3.0})
    req = _req(p, prompt=[1, 2], output=[2, 3, 3])
    plain = _req(SamplingParams(), [1], [4])
    out = apply_logits_processors(logits.clone(), [req, plain])
    ref = logits[0].clone()
    for t in {1, 2, 3}:  # repetition penalty over prompt and output
        ref[t] = ref[t] / 1.5 if ref[t] > 0 else ref[t] * 1.5
    for t, c in {2: 1, 3: 2}.items():  # frequency / presence over output only
        ref[t] -= 0.25 * c + 0.5
    ref[7] += 3.0
    assert torch.allclose(out[0], ref)
    assert torch.equal(out[1], logits[1])  # untouched row


def test_allowed_tokens_and_min_tokens_mask():
    logits = torch.zeros(1, 6)
    p = SamplingParams(allowed_token_ids=[0, 2, 4], min_tokens=3, max_tokens=8,
                       stop_token_ids=[4])
    out = apply_logits_processors(logits.clone(), [_req(p, [1], [2], eos=0)])
    assert torch.isinf(out[0, [0, 1, 3, 4, 5]]).all() and out[0, 2] == 0


def test_repetition_penalty_matches_hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    llm = LLM(tiny_llama, device="cpu")
    prompt = [5, 17, 33, 5, 17, 80, 91, 5]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                      repetition_penalty=1.3), use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                      do_sample=False, repetition_penalty=1.3)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == ref


def test_min_tokens_delays_stop(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12,
                                                  ignore_eos=True), use_tqdm=False)[0]
    first = greedy.outputs[0].token_ids[0]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, min_tokens=4,
                                               stop_token_ids=[first]), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 4
    assert first not in out.outputs[0].token_ids[:4]


def test_banned_tokens_follow_the_generated_tail():
    words = [[5], [7, 8, 9], [3, 4]]
    assert banned_tokens(words, []) == [5]
    assert banned_tokens(words, [1, 7, 8]) == [5, 9]
    assert banned_tokens(words, [7, 8, 3]) == [5, 4]
    assert banned_tokens(words, [8, 7]) == [5]


def test_bad_words_token_ids_with_and_without_space(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = bad_words_token_ids(tok, [" brown fox"])
    plain = tok.encode("brown fox", add_special_tokens=False)
    spaced = tok.encode(" brown fox", add_special_tokens=False)
    assert ids[0] == plain
    assert (spaced in ids) == (spaced != plain and len(spaced) == len(plain))


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_bad_words_are_never_generated(tiny_llama):
    llm = LLM(tiny_llama, device="cpu")
    tok = llm.get_tokenizer()
    params = dict(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = "The quick brown fox"
    greedy = llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    out = greedy.token_ids
    # A two-token word the model produces greedily, and a one-token word.
    word = next(w for i in range(1, len(out))
                if (w := tok.decode(out[i - 1:i + 1]).strip())
                and any(len(ids) == 2 and _contains(out, ids)
                        for ids in bad_words_token_ids(tok, [w])))
    single = tok.decode([out[0]]).strip()
    banned = bad_words_token_ids(tok, [word])
    got = llm.generate(prompt, SamplingParams(bad_words=[word], **params),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got != out and not any(_contains(got, ids) for ids in banned)
    first = min(i for ids in banned for i in range(len(out)) if out[i:i + len(ids)] == ids)
    # Unchanged up to the word's first token; its second one is the first masked choice.
    assert got[:first + 1] == out[:first + 1] and got[first + 1] != out[first + 1]
    if single:
        got = llm.generate(prompt, SamplingParams(bad_words=[single], **params),
                           use_tqdm=False)[0].outputs[0].token_ids
        for ids in bad_words_token_ids(tok, [single]):
            assert not _contains(got, ids)
    with pytest.raises(ValueError, match="bad_words must be"):
        SamplingParams(bad_words=[""])
