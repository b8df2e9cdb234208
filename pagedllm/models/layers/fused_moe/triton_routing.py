"""Top-k routing in one Triton kernel: softmax over the experts, the top k, renormalized.

The torch form is four to five launches per MoE layer (softmax, topk, sum, divide, casts);
at decode sizes each costs more than its arithmetic. One program per token holds its router
row in registers.

At one token (batch-1 decode) the router's product itself joins the same launch
(`router_topk_one_token`): each program computes one expert's logit, stores it rounded to
the model dtype (as the router linear's output is), and counts itself in; the program that
arrives last selects the top k from all logits and resets the counter (the arrival scheme of
`quantization.gemv_split`). Two launches per layer (cuBLAS's product at one row, 5.3 us on an
H200 for Qwen3-30B-A3B's router, then the selection) become one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.pdl import launch_options, pdl_enabled, pdl_trigger, pdl_wait


@triton.jit
def _select_top_k(x, offs, mask, weights_ptr, ids_ptr, TOP_K: tl.constexpr,
                  E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    """Store the top TOP_K of softmax(x) (float32 [E_PAD], padding masked off) and their
    expert ids at weights_ptr / ids_ptr."""
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
        tl.store(weights_ptr + j, tl.maximum(best, 0.0) * scale)
        tl.store(ids_ptr + j, idx.to(tl.int64))
        left = tl.where(offs == idx, -2.0, left)


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_t,
                         TOP_K: tl.constexpr, E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    token = tl.program_id(0)
    offs = tl.arange(0, E_PAD)
    mask = offs < num_experts
    x = tl.load(logits_ptr + token * stride_t + offs, mask=mask,
                other=-float("inf")).to(tl.float32)
    _select_top_k(x, offs, mask, weights_ptr + token * TOP_K, ids_ptr + token * TOP_K,
                  TOP_K, E_PAD, RENORMALIZE)


@triton.jit
def _router_topk_kernel(x_ptr, w_ptr, logits_ptr, count_ptr, weights_ptr, ids_ptr,
                        num_experts, hidden, stride_we, BLOCK_K: tl.constexpr,
                        VEC: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr,
                        RENORMALIZE: tl.constexpr, PDL: tl.constexpr):
    """Program e: logits[e] = x . W[e] (VEC products summed per thread, float32, stored in
    the logits' dtype); the last program to arrive selects the top k (module docstring)."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    expert = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    row = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_K // VEC], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + offs_k
        w = tl.load(row + k, mask=k < hidden, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + k, mask=k < hidden, other=0.0).to(tl.float32)
        acc += tl.sum(w * x, axis=1)
    tl.store(logits_ptr + expert, tl.sum(acc, axis=0).to(logits_ptr.dtype.element_ty))
    tl.debug_barrier()  # the logit stored before the count (release)
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_experts - 1:
        offs = tl.arange(0, E_PAD)
        mask = offs < num_experts
        logits = tl.load(logits_ptr + offs, mask=mask, other=-float("inf"),
                         cache_modifier=".cg").to(tl.float32)
        _select_top_k(logits, offs, mask, weights_ptr, ids_ptr, TOP_K, E_PAD, RENORMALIZE)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


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


class RouterScratch:
    """One MoE layer's logits row (model dtype) and arrival counter (zero between launches)
    for `router_topk_one_token`, made once, so that CUDA-graph replays reuse them."""

    def __init__(self, num_experts: int, dtype: torch.dtype, device: torch.device) -> None:
        self.logits = torch.empty(num_experts, dtype=dtype, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)

    def fits(self, num_experts: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.logits.numel() == num_experts and self.logits.dtype == dtype
                and self.logits.device == device)


def router_topk_one_token(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
                          renormalize: bool, scratch: RouterScratch
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts(x W^T, ...) for one token x [1, H] and the router weight W [E, H], in
    one launch; the same contract as triton_select_experts."""
    num_experts, hidden = router_weight.shape
    if x.shape != (1, hidden):
        raise ValueError(f"router_topk_one_token takes one token of {hidden} features, got "
                         f"{tuple(x.shape)}.")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weights = torch.empty(1, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=x.device)
    pdl = pdl_enabled(x.device)
    e_pad = triton.next_power_of_2(num_experts)
    _router_topk_kernel[(num_experts,)](  # one warp: the selection's reductions in-warp
        x, router_weight, scratch.logits, scratch.count, weights, ids, num_experts, hidden,
        router_weight.stride(0), BLOCK_K=max(16, min(2048, triton.next_power_of_2(hidden))),
        VEC=16, TOP_K=top_k, E_PAD=e_pad, RENORMALIZE=renormalize, PDL=pdl,
        num_warps=4 if e_pad >= 256 else 1, **launch_options(pdl))
    return weights, ids
