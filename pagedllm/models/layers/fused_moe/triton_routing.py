"""Top-k routing in one Triton kernel: softmax over the experts, the top k, renormalized.

The torch form is four to five launches per MoE layer (softmax, topk, sum, divide, casts);
at decode sizes each costs more than its arithmetic. One program per token holds its router
row in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_t,
                         TOP_K: tl.constexpr, E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    token = tl.program_id(0)
    offs = tl.arange(0, E_PAD)
    mask = offs < num_experts
    x = tl.load(logits_ptr + token * stride_t + offs, mask=mask,
                other=-float("inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    e = tl.where(mask, e, 0.0)
    probs = e / tl.sum(e, axis=0)
    # Candidates: the experts' probabilities; a non-finite one (a NaN router row, e.g. a
    # padded row of a captured batch) is -1, so that every pick is a real expert (an index
    # past the experts would fault the alignment), chosen ones -2, padding -3.
    start = tl.where(mask, tl.where(probs == probs, probs, -1.0), -3.0)
    scale = 1.0
    if RENORMALIZE:  # the sum of the top k, found with the same selection as below
        left = start
        chosen = 0.0
        for _ in tl.static_range(TOP_K):
            best = tl.max(left, axis=0)
            idx = tl.min(tl.where(left == best, offs, E_PAD), axis=0)
            chosen += tl.maximum(best, 0.0)
            left = tl.where(offs == idx, -2.0, left)
        scale = 1.0 / tl.maximum(chosen, 1e-30)
    left = start
    for j in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        idx = tl.min(tl.where(left == best, offs, E_PAD), axis=0)  # the lowest index on ties
        tl.store(weights_ptr + token * TOP_K + j, tl.maximum(best, 0.0) * scale)
        tl.store(ids_ptr + token * TOP_K + j, idx.to(tl.int64))
        left = tl.where(offs == idx, -2.0, left)


def triton_select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as routing.select_experts: (weights float32 [T, k], ids int64 [T, k]),
    ids in descending order of probability."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        if router_logits.stride(1) != 1:
            router_logits = router_logits.contiguous()
        e_pad = triton.next_power_of_2(num_experts)
        _topk_softmax_kernel[(num_tokens,)](
            router_logits, weights, ids, num_experts, router_logits.stride(0), TOP_K=top_k,
            E_PAD=e_pad, RENORMALIZE=renormalize, num_warps=4 if e_pad >= 256 else 1)
    return weights, ids
