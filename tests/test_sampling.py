"""Sampler behaviour: seeds, top-k/top-p/min-p distributions, and engine-level sampling."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.worker.sampler import Sampler, SamplingMetadata


def _md(rows: int, temperature=1.0, top_k=None, top_p=None, min_p=None, gens=None):
    t = torch.full((rows,), float(temperature))
    return SamplingMetadata(
        temperature=t,
        top_k=None if top_k is None else torch.full((rows,), top_k),
        top_p=None if top_p is None else torch.full((rows,), float(top_p)),
        min_p=None if min_p is None else torch.full((rows,), float(min_p)),
        all_greedy=temperature == 0,
        generators=gens or {},
    )


def _frequencies(logits: torch.Tensor, md_kwargs: dict, draws: int = 20000) -> torch.Tensor:
    torch.manual_seed(0)
    batch = logits.expand(draws, -1).clone()
    ids, _ = Sampler()(batch, _md(draws, **md_kwargs))
    return torch.bincount(ids, minlength=logits.shape[-1]).float() / draws


PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
LOGITS = PROBS.log().unsqueeze(0)


def test_plain_sampling_follows_the_distribution():
    freq = _frequencies(LOGITS, {})
    assert torch.allclose(freq, PROBS, atol=0.015)


def test_top_p_keeps_the_smallest_nucleus():
    # p=0.7 keeps {0.4, 0.3} exactly; renormalized to 4/7, 3/7.
    freq = _frequencies(LOGITS, {"top_p": 0.7})
    assert torch.allclose(freq, torch.tensor([4 / 7, 3 / 7, 0, 0, 0]), atol=0.015)
    # p=0.75 needs the third token too.
    freq = _frequencies(LOGITS, {"top_p": 0.75})
    assert freq[2] > 0.1 and freq[3] == 0 and freq[4] == 0


def test_min_p_drops_tokens_below_the_scaled_max():
    # min_p=0.3 -> threshold 0.12: keeps 0.4, 0.3, 0.15.
    freq = _frequencies(LOGITS, {"min_p": 0.3})
    expected = torch.tensor([0.4, 0.3, 0.15, 0, 0]) / 0.85
    assert torch.allclose(freq, expected, atol=0.015)


def test_top_k_and_temperature():
    freq = _frequencies(LOGITS, {"top_k": 2})
    assert torch.allclose(freq, torch.tensor([4 / 7, 3 / 7, 0, 0, 0]), atol=0.015)
    # Low temperature sharpens towards the argmax.
    freq = _frequencies(LOGITS, {"temperature": 0.1})
    assert freq[0] > 0.9


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 50)

    def draw(batch: int, row: int) -> list[int]:
        gen = torch.Generator().manual_seed(1234)
        out = []
        for _ in range(10):
            ids, _ = Sampler()(logits.expand(batch, -1).clone(), _md(batch, gens={row: gen}))
            out.append(int(ids[row]))
        return out

    assert draw(1, 0) == draw(7, 3) == draw(16, 15)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, device="cpu")


def test_seed_reproduces_inside_different_batches(llm):
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Hello, my name is", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(["The capital of", "Hello, my name is", "1 2 3", "Who won"],
                         [others, seeded, others, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    # A different seed gives a different sample (16 tokens from ~300: surely different).
    other = SamplingParams(temperature=1.0, seed=43, max_tokens=16, ignore_eos=True)
    assert llm.generate("Hello, my name is", other, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_top_k_one_equals_greedy(llm):
    prompts = ["Hello, my name is", "The quick brown fox", "San Francisco is a"]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16,
                                                  ignore_eos=True), use_tqdm=False)
    topk = llm.generate(prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=16,
                                                ignore_eos=True), use_tqdm=False)
    for g, t in zip(greedy, topk):
        assert g.outputs[0].token_ids == t.outputs[0].token_ids


def test_eos_and_stop_token_ids_finish_with_stop(llm):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = llm.generate("Hello, my name is", greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    out = llm.generate("Hello, my name is", SamplingParams(
        temperature=0, max_tokens=16, stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == tokens[: first + 1]
    out = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=3),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_inverse_cdf_sampling_matches_the_running_sum_and_skips_zero_probabilities():
    """The CPU sampler's two-level inverse CDF equals a direct search of the running sum,
    and never returns an id of probability 0, even at u = 0 or u just below 1."""
    from pagedllm.worker.sampler import inverse_cdf_sample

    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 1000, generator=gen)
    probs[:, ::3] = 0
    probs[2, :900] = 0  # mass only in the last (partial) block
    u = torch.rand(6, 1, dtype=torch.float64, generator=gen)
    cdf = probs.double().cumsum(-1)
    want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    assert inverse_cdf_sample(probs, u).tolist() == want.tolist()
    for edge in (0.0, 1 - 1e-16):
        ids = inverse_cdf_sample(probs, torch.full((6, 1), edge, dtype=torch.float64))
        assert (probs[torch.arange(6), ids] > 0).all(), (edge, ids)


def test_warm_up_runs_the_step_tail_at_every_row_count(tiny_llama):
    """The start-up warm-up (run on CUDA, where a kernel's first launch waits for the device
    to drain) sends 1 to max_num_seqs rows through the LM head and the fused sampler, and a
    few counts through the torch sampler with top-k / top-p / min-p."""
    llm = LLM(tiny_llama, device="cpu", block_size=16, max_num_seqs=9)
    runner = llm.engine.executor.runner
    seen: dict[str, list[int]] = {"head": [], "fused": [], "torch": []}
    head, sample, full = runner.model.compute_logits, runner.sampler.sample, runner.sampler

    def record(key, inner, rows_of):
        def call(*args):
            seen[key].append(rows_of(*args))
            return inner(*args)
        return call

    runner.model.compute_logits = record("head", head, lambda h: h.shape[0])
    runner.sampler = type("Recorded", (), {
        "sample": staticmethod(record("fused", sample, lambda lg, md: lg.shape[0])),
        "__call__": staticmethod(record("torch", full, lambda lg, md: md.top_p.shape[0])),
    })()
    try:
        runner._warm_up_step_tail()
    finally:
        runner.model.compute_logits, runner.sampler = head, full
    assert seen["head"] == list(range(1, 10))
    assert seen["fused"] == list(range(1, 10))
    assert seen["torch"] == [1, 2, 3, 8]
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                       SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
