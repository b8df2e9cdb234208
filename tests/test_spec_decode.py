"""Speculative decoding end to end on tiny random models: greedy output equals
non-speculative output for the n-gram proposer and for draft models (another tiny model of
the same vocabulary, and the target itself, which accepts every draft), under preemption,
chunked prefill, prefix caching, n > 1, penalties, logprobs, stop tokens, stop strings and
max_tokens inside accepted runs; every KV block is returned; sampled outputs draw from the
same distribution as without speculation (chi-square); bad configurations are refused."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from conftest import TINY, assert_pool_whole
from model_utils import make_tiny_model
from scipy.stats import chi2_contingency

from pagedllm import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
BASE = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def draft_llama(tmp_path_factory) -> str:
    """Another tiny Llama (other seed, one layer) over the same tokenizer and vocabulary."""
    folder = tmp_path_factory.mktemp("tiny_draft")
    return make_tiny_model(folder, "llama", seed=1, **{**TINY, "num_hidden_layers": 1})


def copy_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (the n-gram proposer finds its drafts there), and
    plain random ones."""
    rng = random.Random(seed)
    out = []
    for n, reps in [(20, 3), (7, 6), (12, 2), (33, 1), (5, 9), (60, 2)]:
        piece = [rng.randrange(10, 340) for _ in range(n)]
        out.append(piece * reps)
    return out


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 40, **kwargs) -> list:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    """(draft runs, draft tokens, accepted tokens) since the engine started (the stats the
    offline engine has not handed to a logger yet)."""
    it = llm.engine.core.stats._current
    return it.spec_num_drafts, it.spec_num_draft_tokens, it.spec_num_accepted_tokens


@pytest.fixture(scope="module")
def reference(tiny_llama) -> tuple[list, list]:
    llm = LLM(tiny_llama, **BASE)
    prompts = copy_prompts()
    return prompts, greedy(llm, prompts)


def spec_config(kind: str, draft_llama: str, tiny_llama: str) -> dict:
    if kind == "ngram":
        return NGRAM
    return {"model": draft_llama if kind == "draft" else tiny_llama,
            "num_speculative_tokens": 3}


MODES = {
    "plain": {},
    # 24 blocks of 16 tokens hold far less than the batch's ~560 tokens.
    "preemption": {"num_gpu_blocks_override": 24, "max_model_len": 256},
    "chunked": {"max_num_batched_tokens": 24, "max_num_seqs": 4},
    "no_prefix_caching": {"enable_prefix_caching": False, "block_size": 8},
}


@pytest.mark.parametrize("kind", ["ngram", "draft", "self"])
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_equals_non_speculative(kind, mode, tiny_llama, draft_llama, reference):
    prompts, expected = reference
    llm = LLM(tiny_llama, **BASE, **MODES[mode],
              speculative_config=spec_config(kind, draft_llama, tiny_llama))
    assert greedy(llm, prompts) == expected
    assert_pool_whole(llm)
    drafts, draft_tokens, accepted = spec_counts(llm)
    assert drafts > 0 and draft_tokens >= drafts
    if kind == "self":  # the target drafts for itself: every draft is accepted
        assert accepted == draft_tokens
    elif kind == "ngram":
        assert 0 < accepted < draft_tokens
    if mode == "preemption":
        assert llm.get_stats()["num_preemptions"] > 0


def test_self_draft_acceptance_per_position(tiny_llama):
    llm = LLM(tiny_llama, **BASE, speculative_config={"model": tiny_llama,
                                                      "num_speculative_tokens": 4})
    greedy(llm, copy_prompts()[:2], max_tokens=41)
    it = llm.engine.core.stats._current
    # Every run of 4 drafts is accepted whole: each position counts every run.
    assert it.spec_num_draft_tokens == 4 * it.spec_num_drafts
    assert it.spec_accepted_per_pos == [it.spec_num_drafts] * 4


@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_max_tokens_and_stop_tokens_inside_accepted_runs(kind, tiny_llama, draft_llama,
                                                         reference):
    prompts, expected = reference
    llm = LLM(tiny_llama, **BASE, speculative_config=spec_config(kind, draft_llama,
                                                                  tiny_llama))
    for max_tokens in (1, 2, 3, 5, 6, 11):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [e[:max_tokens] for e in expected]
        assert all(o.outputs[0].finish_reason == "length" for o in outs)
    # A stop token in the middle of the expected output: the output ends at it.
    for prompt, exp in zip(prompts, expected):
        stop = exp[9]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                stop_token_ids=[stop])
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == exp[:exp.index(stop) + 1]
        assert out.finish_reason == "stop" and out.stop_reason == stop
    assert_pool_whole(llm)


def test_max_model_len_inside_accepted_runs(tiny_llama, draft_llama):
    prompts = copy_prompts()
    plain = LLM(tiny_llama, **BASE, max_model_len=90)
    expected = greedy(plain, [p[:80] for p in prompts])
    for kind in ("ngram", "self"):
        llm = LLM(tiny_llama, **BASE, max_model_len=90,
                  speculative_config=spec_config(kind, draft_llama, tiny_llama))
        got = greedy(llm, [p[:80] for p in prompts])
        assert got == expected
        assert all(len(p[:80]) + len(g) <= 90 for p, g in zip(prompts, got))
        assert_pool_whole(llm)


def test_stop_strings_inside_accepted_runs(tiny_llama):
    plain = LLM(tiny_llama, **BASE)
    spec = LLM(tiny_llama, **BASE, speculative_config={"model": tiny_llama,
                                                       "num_speculative_tokens": 4})
    prompts = ["The quick brown fox jumps over the lazy dog. The quick brown fox",
               "1 2 3 4 5 6 7 8 9 10, 1 2 3 4 5 6"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    texts = [o.outputs[0].text for o in plain.generate(prompts, params, use_tqdm=False)]
    for prompt, text in zip(prompts, texts):
        stop = text[len(text) // 2:len(text) // 2 + 3]
        assert stop.strip(), text
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        got = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert (got.text, got.finish_reason, got.stop_reason) == (
            want.text, "stop", stop)
        assert got.text == text[:text.index(stop)]
    assert_pool_whole(spec)


@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_prefix_caching_registers_only_accepted_tokens(kind, tiny_llama, draft_llama):
    """Blocks cached while speculating hold the KV of the tokens generated: a prompt made
    of a first request's prompt and output hits them and continues as a fresh engine."""
    prompts = copy_prompts()[:3]
    llm = LLM(tiny_llama, **BASE, block_size=8,
              speculative_config=spec_config(kind, draft_llama, tiny_llama))
    first = greedy(llm, prompts, max_tokens=40)
    second_prompts = [p + out for p, out in zip(prompts, first)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in second_prompts], params,
                        use_tqdm=False)
    for o, p in zip(outs, second_prompts):
        # Every full block but the one holding the last generated token is a hit.
        assert o.num_cached_tokens >= (len(p) - 1) // 8 * 8 - 8
    fresh = LLM(tiny_llama, **BASE, block_size=8, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in outs] == greedy(fresh, second_prompts, 20)
    assert_pool_whole(llm)


@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_n_greater_than_one(kind, tiny_llama, draft_llama, reference):
    prompts, expected = reference
    llm = LLM(tiny_llama, **BASE, speculative_config=spec_config(kind, draft_llama,
                                                                  tiny_llama))
    params = SamplingParams(n=3, temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for o, exp in zip(outs, expected):
        assert [c.token_ids for c in o.outputs] == [exp] * 3
    assert spec_counts(llm)[2] > 0
    assert_pool_whole(llm)


def test_penalties_see_the_drafts_before_each_position(tiny_llama):
    """Penalties and bad words read the token history, accepted drafts included."""
    prompts = copy_prompts()
    kwargs = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.5, presence_penalty=0.3),
              dict(min_tokens=12)]
    plain = LLM(tiny_llama, **BASE)
    spec = LLM(tiny_llama, **BASE, speculative_config={"model": tiny_llama,
                                                       "num_speculative_tokens": 4})
    ngram = LLM(tiny_llama, **BASE, speculative_config=NGRAM)
    for kw in kwargs:
        expected = greedy(plain, prompts, **kw)
        assert greedy(spec, prompts, **kw) == expected, kw
        assert greedy(ngram, prompts, **kw) == expected, kw
    assert spec_counts(spec)[2] > 0 and spec_counts(ngram)[2] > 0


def test_logprobs_of_accepted_tokens(tiny_llama):
    prompts = copy_prompts()[:3]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3)
    plain = LLM(tiny_llama, **BASE).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    spec_llm = LLM(tiny_llama, **BASE, speculative_config=NGRAM)
    spec = spec_llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                             use_tqdm=False)
    assert spec_counts(spec_llm)[2] > 0
    for a, b in zip(plain, spec):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        assert len(b.logprobs) == len(b.token_ids)
        for la, lb in zip(a.logprobs, b.logprobs):
            assert list(la) == list(lb)  # the same top tokens, in order
            for tok in la:
                assert lb[tok].logprob == pytest.approx(la[tok].logprob, abs=1e-4)
                assert lb[tok].rank == la[tok].rank
        assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-3)


def test_abort_mid_run_returns_every_block(tiny_llama):
    from pagedllm.engine.llm_engine import LLMEngine

    for config in (NGRAM, {"model": tiny_llama, "num_speculative_tokens": 3}):
        llm = LLM(tiny_llama, **BASE, speculative_config=config)
        engine: LLMEngine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        for i, p in enumerate(copy_prompts()):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
        for _ in range(6):
            engine.step()
        assert spec_counts(llm)[0] > 0
        assert engine.core.scheduler.kv.req_blocks
        engine.abort_request([f"r{i}" for i in range(len(copy_prompts()))])
        while engine.has_unfinished_requests():
            engine.step()
        assert_pool_whole(llm)


def test_ngram_with_tensor_parallelism(tiny_llama, reference):
    """Every rank computes logits over all verified rows; rank 0 verifies (gloo on CPU)."""
    prompts, expected = reference
    llm = LLM(tiny_llama, **BASE, tensor_parallel_size=2, speculative_config=NGRAM)
    assert greedy(llm, prompts) == expected
    assert spec_counts(llm)[2] > 0
    assert_pool_whole(llm)
    llm.engine.shutdown()


# ---------------------------------------------------------------- sampled
def _sampled_outputs(llm: LLM, prompt: list[int], allowed: list[int], num: int,
                     temperature: float = 1.0) -> list[tuple[int, ...]]:
    params = [SamplingParams(temperature=temperature, max_tokens=5, ignore_eos=True,
                             allowed_token_ids=allowed, seed=1000 + i) for i in range(num)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * num, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outs]


def _cells(samples: list[tuple[int, ...]], allowed: list[int]) -> np.ndarray:
    """Counts of (position, token) for positions 1..4 (position 0 is never speculated)."""
    counts = Counter((j, t) for s in samples for j, t in enumerate(s) if j > 0)
    return np.array([counts[(j, t)] for j in range(1, 5) for t in allowed])


def test_sampled_distribution_matches_non_speculative(tiny_llama, draft_llama):
    """Speculative sampling (n-gram point-mass drafts and a draft model's sampled drafts)
    draws from the target's distribution: chi-square of per-position token counts against
    non-speculative sampling over many seeds, on a 4-token vocabulary."""
    allowed = [21, 57, 133, 250]
    prompt = [21, 57, 133, 250, 21, 57, 133, 21, 57, 21] * 3
    num = 1200
    plain = _sampled_outputs(LLM(tiny_llama, **BASE), prompt, allowed, num)
    base = _cells(plain, allowed)
    for config in (NGRAM, {"model": draft_llama, "num_speculative_tokens": 3}):
        llm = LLM(tiny_llama, **BASE, speculative_config=config)
        spec = _cells(_sampled_outputs(llm, prompt, allowed, num), allowed)
        drafts, draft_tokens, accepted = spec_counts(llm)
        assert accepted > 0.1 * draft_tokens  # drafts were accepted and rejected
        assert accepted < draft_tokens
        _, p, _, _ = chi2_contingency(np.stack([base, spec]) + 0.5)
        assert p > 1e-3, (config, p)
    # The test has power: another temperature is told apart.
    other = _cells(_sampled_outputs(LLM(tiny_llama, **BASE), prompt, allowed, num, 0.6),
                   allowed)
    assert chi2_contingency(np.stack([base, other]) + 0.5)[1] < 1e-3


def test_seeded_requests_repeat_whatever_the_batch(tiny_llama, draft_llama):
    prompts = copy_prompts()
    for config in (NGRAM, {"model": draft_llama, "num_speculative_tokens": 3}):
        llm = LLM(tiny_llama, **BASE, speculative_config=config)
        params = SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True, seed=7)
        alone = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        batch = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                             use_tqdm=False)
        assert alone[0].outputs[0].token_ids == batch[0].outputs[0].token_ids
        assert_pool_whole(llm)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("config, needle", [
    ({"method": "bogus", "num_speculative_tokens": 2}, "Unknown speculative_config method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "eagle", "model": "x", "num_speculative_tokens": 2}, "'eagle' is not supported"),
    ({"method": "eagle3", "model": "x", "num_speculative_tokens": 2},
     "'eagle3' is not supported"),
    ('{"method": "ngram"', "--speculative-config must be a JSON object"),
    ({"model": "/nonexistent/draft", "num_speculative_tokens": 2}, "nonexistent"),
])
def test_bad_speculative_config(tiny_llama, config, needle):
    with pytest.raises(ValueError, match=needle):
        LLM(tiny_llama, **BASE, speculative_config=config)


def test_draft_with_another_vocabulary_is_refused(tiny_llama, tmp_path):
    other = make_tiny_model(tmp_path / "other_vocab", "llama", vocab_size=300, **TINY)
    with pytest.raises(ValueError, match="must share the target's tokenizer and vocabulary"):
        LLM(tiny_llama, **BASE, speculative_config={"model": other,
                                                    "num_speculative_tokens": 2})


def test_draft_on_another_device_type_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="differs from the target's device 'cpu'"):
        LLM(tiny_llama, **BASE, speculative_config={"model": tiny_llama, "device": "cuda",
                                                    "num_speculative_tokens": 2})


def test_draft_with_an_fp8_kv_cache_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="with a speculative draft model is not supported"):
        LLM(tiny_llama, **BASE, kv_cache_dtype="fp8",
            speculative_config={"model": tiny_llama, "num_speculative_tokens": 2})


def test_async_scheduling_with_speculation_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="async_scheduling=True does not work"):
        LLM(tiny_llama, **BASE, async_scheduling=True, speculative_config=NGRAM)


def test_cli_refuses_a_bad_speculative_config(tiny_llama):
    import subprocess
    import sys

    from server_utils import REPO_ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", tiny_llama,
         "--device", "cpu", "--speculative-config",
         '{"method": "ngram", "num_speculative_tokens": -1}'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "num_speculative_tokens must be an integer from 1 to 16" in proc.stderr
