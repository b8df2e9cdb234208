"""Speculative decoding's parts on their own: the config, the n-gram proposer and the
rejection sampler (greedy exactness, and a chi-square test that speculative sampling draws
from the target's distribution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram_proposer import NgramProposer, propose_ngram
from pagedllm.spec_decode.rejection_sampler import rejection_sample


# ---------------------------------------------------------------- config
def test_config_parses_dicts_and_json():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, '
                                  '"prompt_lookup_max": 3}')
    assert (cfg.method, cfg.num_speculative_tokens, cfg.lookup_range) == ("ngram", 4, (1, 3))
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}
                                   ).lookup_range == (1, 5)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_min": 2}).lookup_range == (2, 2)
    draft = SpeculativeConfig.parse({"model": "some/draft", "num_speculative_tokens": 3})
    assert draft.method == "draft_model" and draft.model == "some/draft"


@pytest.mark.parametrize("value, match", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "not supported"),
    ({"method": "eagle3", "model": "x", "num_speculative_tokens": 2}, "not supported"),
    ({"method": "lookahead", "num_speculative_tokens": 2}, "Unknown speculative_config method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({"num_speculative_tokens": 3}, "needs 'method'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "must not exceed"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0},
     "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "takes no 'model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "acceptance_method": "typical"},
     "unsupported keys \\['acceptance_method'\\]"),
    ("{not json", "JSON object"),
    ([1, 2], "must be a dict"),
])
def test_config_refuses_bad_values(value, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(value)


# ---------------------------------------------------------------- n-gram proposer
def test_ngram_takes_the_longest_suffix_and_its_most_recent_occurrence():
    tokens = np.array([7, 1, 2, 9, 9, 1, 2, 3, 4, 8, 1, 2])
    # [1, 2] occurs at 1 and 5: the most recent one (5) is continued.
    assert propose_ngram(tokens, 3, 1, 4).tolist() == [3, 4, 8]
    # A longer suffix wins over a more recent short one.
    tokens = np.array([5, 6, 7, 1, 0, 7, 2, 5, 6, 7])
    assert propose_ngram(tokens, 2, 1, 3).tolist() == [1, 0]
    assert propose_ngram(tokens, 2, 1, 1).tolist() == [2, 5]


def test_ngram_edge_cases():
    assert propose_ngram(np.array([1, 2, 3, 4]), 3, 1, 4).tolist() == []
    assert propose_ngram(np.array([4]), 3, 1, 4).tolist() == []
    # The continuation ends where the tokens end.
    assert propose_ngram(np.array([1, 2, 1, 2]), 5, 2, 2).tolist() == [1, 2]
    assert propose_ngram(np.array([3, 3, 3]), 4, 1, 2).tolist() == [3]
    proposer = NgramProposer(4, 1, 3)
    batch = {"a": [1, 2, 3, 1, 2], "b": [9, 8], "c": [5, 5, 5, 5]}
    assert [proposer.propose(r, t, k) for (r, t), k in zip(batch.items(), [4, 4, 1])] == [
        [3, 1, 2], [], [5]]
    assert [proposer.propose(r, t, k) for (r, t), k in zip(batch.items(), [0, 4, 4])] == [
        [], [], [5]]  # [5, 5, 5] at 0


def test_ngram_matches_the_window_search_it_replaced():
    """Against a direct search over every window, on random and repetitive sequences."""
    def reference(tokens, k, min_n, max_n):
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            suffix = tokens[len(tokens) - n:]
            starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == suffix]
            if starts:
                return tokens[starts[-1] + n:starts[-1] + n + k]
        return []

    rng = np.random.default_rng(0)
    for _ in range(300):
        vocab = int(rng.integers(2, 12))
        tokens = rng.integers(0, vocab, int(rng.integers(1, 60))).tolist()
        k, lo = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 4))
        got = propose_ngram(np.array(tokens), k, lo, hi).tolist()
        assert got == reference(tokens, k, lo, hi), (tokens, k, lo, hi)


def test_ngram_proposer_follows_growing_and_changed_token_lists():
    proposer = NgramProposer(3, 1, 2)
    tokens = [4, 5, 6, 4]
    assert proposer.propose("r", tokens, 3) == [5, 6, 4]
    tokens += [5, 9, 4, 5]  # grows: only the new tokens are copied
    assert proposer.propose("r", tokens, 3) == [9, 4, 5]  # [4, 5] last seen at 3
    assert proposer.propose("r", [1, 2, 1], 3) == [2, 1]  # another list: rebuilt
    proposer.forget("r")
    assert proposer.propose("r", [7, 7], 3) == [7]


# ---------------------------------------------------------------- rejection sampler
def _layout(num_drafts: list[int], vocab: int, gen: torch.Generator):
    rows = sum(num_drafts) + len(num_drafts)
    probs = torch.softmax(torch.randn(rows, vocab, generator=gen) * 2, dim=1)
    return probs, probs.argmax(dim=1)


def test_greedy_keeps_the_agreeing_prefix_and_ends_with_the_argmax():
    gen = torch.Generator().manual_seed(0)
    num_drafts = [3, 3, 0, 2]
    probs, argmax = _layout(num_drafts, 11, gen)
    starts = np.cumsum([0] + [k + 1 for k in num_drafts])
    drafts, want = [], []
    for r, (k, agree) in enumerate(zip(num_drafts, [3, 1, 0, 0])):
        best = argmax[starts[r]:starts[r + 1]].tolist()
        proposal = [best[j] if j < agree else (best[j] + 1) % 11 for j in range(k)]
        drafts += proposal
        want.append(best[:agree + 1])
    got = rejection_sample(probs, argmax, torch.tensor(drafts), num_drafts, None,
                           torch.ones(len(num_drafts), dtype=torch.bool))
    assert got == want


def _chi_square_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=len(probs))
    probs = probs.astype(np.float64)
    expected = probs / probs.sum() * counts.sum()
    return chisquare(counts, expected).pvalue


@pytest.mark.parametrize("proposer", ["draft_model", "deterministic"])
def test_speculative_sampling_draws_from_the_target(proposer):
    """40,000 requests, 3 proposals each, position-dependent target distributions over 6
    tokens: output token j follows p_j whatever was proposed."""
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    vocab, k, reqs = 6, 3, 40_000
    target = torch.softmax(torch.randn(k + 1, vocab, generator=gen), dim=1)  # p_0 .. p_3
    draft = torch.softmax(torch.randn(k, vocab, generator=gen), dim=1)  # q_0 .. q_2
    if proposer == "draft_model":
        drafts = torch.multinomial(draft, reqs, replacement=True, generator=gen).T  # [R, k]
        draft_probs = draft.repeat(reqs, 1)
    else:  # n-gram style: the same fixed guesses (each position's likeliest) everywhere
        drafts = target[:k].argmax(dim=1).unsqueeze(0).repeat(reqs, 1)
        draft_probs = None
    out = rejection_sample(target.repeat(reqs, 1), target.argmax(1).repeat(reqs),
                           drafts.reshape(-1), [k] * reqs, draft_probs,
                           torch.zeros(reqs, dtype=torch.bool))
    assert all(1 <= len(o) <= k + 1 for o in out)
    lengths = np.array([len(o) for o in out])
    assert 0 < (lengths > 1).mean() < 1  # some proposals were accepted, some not
    for j in range(k + 1):
        tokens = np.array([o[j] for o in out if len(o) > j])
        assert len(tokens) > 300, j  # enough for the chi-square test at every position
        assert _chi_square_pvalue(tokens, target[j].numpy()) > 1e-4, j


def test_seeded_requests_draw_the_same_whatever_their_neighbours():
    gen = torch.Generator().manual_seed(5)
    probs, argmax = _layout([4, 4, 4], 9, gen)
    drafts = torch.tensor([1, 2, 3, 4] * 3)
    runs = []
    for neighbour_seed in (1, 2):
        torch.manual_seed(neighbour_seed)
        gens = {1: torch.Generator().manual_seed(77)}
        runs.append(rejection_sample(probs, argmax, drafts, [4, 4, 4], None,
                                     torch.zeros(3, dtype=torch.bool), gens)[1])
    assert runs[0] == runs[1]
