"""Per-request logit adjustments: penalties, logit_bias, allowed_token_ids, bad_words,
min_tokens.

Applied only to the rows of requests that ask for them, before temperature and sampling.
"""

from __future__ import annotations

from typing import Any

import torch


def needs_processing(req: Any) -> bool:
    p = req.sampling_params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                or p.logit_bias or p.allowed_token_ids or p.bad_words_token_ids
                or req.num_output_tokens < p.min_tokens)


def apply_logits_processors(logits: torch.Tensor, requests: list[Any]) -> torch.Tensor:
    """Adjust logits [R, V] in place for the requests (row i <-> requests[i]) that need it."""
    device = logits.device
    for row, req in enumerate(requests):
        if not needs_processing(req):
            continue
        p = req.sampling_params
        vocab = logits.shape[1]
        out = logits[row]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_token_ids)), device=device)
            vals = out[seen]
            out[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                    vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            counts = torch.bincount(torch.tensor(req.output_token_ids, device=device),
                                    minlength=vocab)[:vocab].to(out.dtype)
            out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=device)
            out[ids] += torch.tensor(list(p.logit_bias.values()), device=device, dtype=out.dtype)
        if p.allowed_token_ids:
            keep = torch.full((vocab,), float("-inf"), device=device, dtype=out.dtype)
            keep[torch.tensor(p.allowed_token_ids, device=device)] = 0
            out += keep
        if p.bad_words_token_ids:
            banned = banned_tokens(p.bad_words_token_ids, req.output_token_ids)
            if banned:
                out[torch.tensor(banned, device=device)] = float("-inf")
        if req.num_output_tokens < p.min_tokens:
            stops = set(p.all_stop_token_ids)
            if req.eos_token_id is not None and not p.ignore_eos:
                stops.add(req.eos_token_id)
            if stops:
                out[torch.tensor(sorted(stops), device=device)] = float("-inf")
    return logits


def banned_tokens(bad_words: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """The last token of every bad word whose other tokens end the output so far (a
    one-token bad word is always banned)."""
    banned = []
    for word in bad_words:
        prefix = len(word) - 1
        if prefix == 0 or (len(output_token_ids) >= prefix
                           and output_token_ids[-prefix:] == word[:-1]):
            banned.append(word[-1])
    return banned


def bad_words_token_ids(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Token ids of each bad word as it would appear at the start of the text and, where
    the tokenizer folds a leading space into the first token, after a space."""
    out: list[list[int]] = []
    for word in bad_words:
        word = word.lstrip()
        plain = tokenizer.encode(word, add_special_tokens=False)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        for ids in (plain, spaced):
            if ids and ids not in out and (ids is plain or len(ids) == len(plain)):
                out.append(ids)
    return out
