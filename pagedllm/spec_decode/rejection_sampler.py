"""Verification of proposed tokens: exact in distribution (speculative sampling).

For each request with K proposed tokens x_1..x_K, the target model scored K + 1 positions:
the distribution p_j after each prefix (already processed by the logits pipeline and the
sampler's temperature / top-k / top-p / min-p). Proposal j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)), where q_j is the proposer's distribution (a point mass for a
deterministic proposer such as n-gram lookup). At the first rejection the output token is
drawn from the residual max(p_j - q_j, 0); when all K are accepted, a bonus token is drawn
from p_{K+1}. Each output token is then distributed as if sampled from the target alone.
Greedy requests accept while the proposal equals the target's argmax and end with that
argmax, so their tokens equal non-speculative greedy decoding.
"""

from __future__ import annotations

import torch

from pagedllm.worker.sampler import random_sample


def rejection_sample(target_probs: torch.Tensor, target_argmax: torch.Tensor,
                     draft_ids: torch.Tensor, num_drafts: list[int],
                     draft_probs: torch.Tensor | None, greedy: torch.Tensor,
                     generators: dict[int, torch.Generator] | None = None) -> list[list[int]]:
    """The output tokens of each request: its accepted proposals and one more token.

    target_probs: [sum(K_r + 1), V] sampling distribution at every scored position,
        request by request (rows of greedy requests are not read; when every request is
        greedy, any tensor of that shape, e.g. the logits).
    target_argmax: [sum(K_r + 1)] the target's greedy choice at those positions.
    draft_ids: [sum(K_r)] proposed ids, request by request.
    num_drafts: K_r per request (0: a plain decode, which samples one token).
    draft_probs: [sum(K_r), V] proposal distributions, or None for deterministic proposals.
    greedy: [R] bool, requests decoding greedily.
    generators: request row -> generator of seeded requests (their draws use it only).
    """
    generators = generators or {}
    device = target_probs.device
    num_reqs = len(num_drafts)
    k = torch.tensor(num_drafts, dtype=torch.long)
    total = int(k.sum())
    target_start = (torch.cumsum(k + 1, 0) - (k + 1)).to(device)
    draft_start = (torch.cumsum(k, 0) - k).to(device)
    k_dev = k.to(device)
    req_of_draft = torch.repeat_interleave(torch.arange(num_reqs, device=device), k_dev)
    position = torch.arange(total, device=device) - draft_start[req_of_draft]
    target_row = target_start[req_of_draft] + position

    # Accept or reject every proposal at once; only the leading accepted run counts.
    uniform = torch.rand(total, device=device)
    for row, gen in generators.items():
        if num_drafts[row]:
            start = int(draft_start[row])
            uniform[start:start + num_drafts[row]] = torch.rand(
                num_drafts[row], device=device, generator=gen)
    p_x = target_probs[target_row, draft_ids]
    q_x = (draft_probs[torch.arange(total, device=device), draft_ids]
           if draft_probs is not None else torch.ones_like(p_x))
    accept = uniform * q_x < p_x
    accept = torch.where(greedy[req_of_draft], draft_ids == target_argmax[target_row], accept)
    first_reject = torch.where(accept, k_dev[req_of_draft], position)
    num_accepted = k_dev.clone().scatter_reduce_(0, req_of_draft, first_reject, "amin")

    # The last token: from the residual at a rejection, else the bonus from p_{K+1}.
    final_row = target_start + num_accepted
    probs = target_probs[final_row]
    if total:
        rejected = (num_accepted < k_dev).unsqueeze(1)
        index = (draft_start + num_accepted).clamp_(max=total - 1)  # the rejected proposal
        if draft_probs is not None:
            q = draft_probs[index]
        else:  # a point mass on the proposed id: the residual is p without that id
            q = torch.zeros_like(probs).scatter_(1, draft_ids[index].unsqueeze(1), 1.0) * probs
        residual = (probs - q * rejected).clamp_min_(0.0)
        # p and q agree to rounding: no residual mass is left, so p itself is used.
        probs = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, probs)
    if bool(greedy.all()):
        final = target_argmax[final_row]
    else:
        final = torch.where(greedy, target_argmax[final_row], random_sample(probs, generators))

    accepted, last, drafts = (t.tolist() for t in (num_accepted.cpu(), final.cpu(),
                                                   draft_ids.cpu()))
    out = []
    start = 0
    for r in range(num_reqs):
        out.append(drafts[start:start + accepted[r]] + [last[r]])
        start += num_drafts[r]
    return out
