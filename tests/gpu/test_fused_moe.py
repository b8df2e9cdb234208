"""The fused MoE Triton kernels against the torch reference: random routing, 8-128 experts,
top-k 1-8, bf16, 1 to 8192 tokens, ||out - ref|| / ||ref|| < 1e-2; the one-kernel top-k
routing against torch's; CUDA-graph capture; the MoE layer dispatching to them.

Runs on a CUDA device (self-contained: ``python -m pytest tests/gpu/test_fused_moe.py``).
``python tests/gpu/test_fused_moe.py`` with ``TRITON_INTERPRET=1`` runs small cases on the
CPU under the Triton interpreter (tests/test_triton_interpreter.py).
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.models.layers.fused_moe import select_experts, torch_experts  # noqa: E402
from pagedllm.models.layers.fused_moe.reference import torch_align_tokens  # noqa: E402
from pagedllm.models.layers.fused_moe.routing import torch_select_experts  # noqa: E402
from pagedllm.models.layers.fused_moe.triton_moe import (  # noqa: E402
    align_tokens,
    triton_experts,
)
from pagedllm.models.layers.fused_moe.triton_routing import triton_select_experts  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _case(device: str, dtype: torch.dtype, tokens: int, experts: int, top_k: int,
          hidden: int, inter: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + tokens + 7 * experts + top_k)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(device, dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(device, torch.float32)
    weights, ids = torch_select_experts(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_experts(device: str, dtype: torch.dtype, tokens: int, experts: int, top_k: int,
                  hidden: int = 256, inter: int = 128) -> None:
    x, w13, w2, weights, ids = _case(device, dtype, tokens, experts, top_k, hidden, inter)
    out = triton_experts(x, w13, w2, weights, ids)
    ref = torch_experts(x, w13, w2, weights, ids)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = _rel_err(out, ref)
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), (tokens, experts, top_k, err)


def check_moe_gemv(device: str, dtype: torch.dtype, experts: int, top_k: int, hidden: int,
                   inter: int, seed: int = 0) -> None:
    """The one-token GEMV path against the torch reference; its routing repeats an expert
    once where top_k > 1 does not forbid it (the reference sums both slots as well)."""
    x, w13, w2, weights, ids = _case(device, dtype, 1, experts, top_k, hidden, inter, seed)
    out = triton_experts(x, w13, w2, weights, ids, gemv_max_tokens=1)
    ref = torch_experts(x, w13, w2, weights, ids)
    assert out.shape == ref.shape == (1, hidden) and out.dtype == ref.dtype
    err = _rel_err(out, ref)
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), (experts, top_k, hidden, err)


def check_alignment(device: str, tokens: int, experts: int, top_k: int, block_m: int) -> None:
    """Every pair appears once, in a block of its own expert; the blocks, the total and each
    expert's run (its pairs, padding only at its end) equal the torch reference's; the order
    inside a run may differ (atomic cursors), also across the blocks of a long run."""
    _, _, _, _, ids = _case(device, torch.float32, tokens, experts, top_k, 16, 16)
    sorted_ids, block_expert, total, max_padded = align_tokens(ids, experts, block_m)
    flat = ids.reshape(-1).cpu()
    num_pairs = flat.numel()
    s = sorted_ids.cpu()[: int(total.item())]
    real = s[s < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    block_of = torch.arange(len(s)) // block_m
    be = block_expert.cpu()
    assert (be[block_of[s < num_pairs]] == flat[real]).all()
    assert int(total.item()) <= max_padded and (be[int(total.item()) // block_m:] == -1).all()
    want_ids, want_be, want_total, want_max = torch_align_tokens(ids, experts, block_m)
    assert max_padded == want_max
    assert torch.equal(total.cpu(), want_total.cpu()) and torch.equal(be, want_be.cpu())
    want = want_ids.cpu()
    got_all = sorted_ids.cpu()
    for e in range(experts):
        run = (be == e).repeat_interleave(block_m)
        got_run, want_run = got_all[run], want[run]
        assert torch.equal(got_run.sort().values, want_run.sort().values), e
        real_count = int((got_run < num_pairs).sum())
        assert (got_run[:real_count] < num_pairs).all(), e  # padding only at the end


@pytest.mark.parametrize("experts,top_k", [(8, 1), (8, 2), (16, 4), (64, 6), (128, 8), (8, 8)])
@pytest.mark.parametrize("tokens", [1, 3, 16, 100, 1000, 8192])
def test_fused_moe_matches_reference_bf16(experts, top_k, tokens):
    check_experts("cuda", torch.bfloat16, tokens, experts, top_k)


@pytest.mark.parametrize("experts,top_k,hidden,inter", [
    (128, 8, 2048, 768), (8, 2, 4096, 14336), (60, 4, 2048, 1408), (8, 1, 200, 72),
    (16, 8, 96, 40), (64, 6, 2048, 768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_moe_gemv_matches_reference(experts, top_k, hidden, inter, dtype):
    check_moe_gemv("cuda", dtype, experts, top_k, hidden, inter)


def test_moe_gemv_in_cuda_graph():
    """Captured once, replayed on new routing: the same output as eager."""
    x, w13, w2, weights, ids = _case("cuda", torch.bfloat16, 1, 128, 8, 2048, 768)
    static = [x.clone(), weights.clone(), ids.clone()]
    triton_experts(static[0], w13, w2, static[1], static[2], gemv_max_tokens=1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_experts(static[0], w13, w2, static[1], static[2], gemv_max_tokens=1)
    _, _, _, weights2, ids2 = _case("cuda", torch.bfloat16, 1, 128, 8, 2048, 768, seed=5)
    static[1].copy_(weights2)
    static[2].copy_(ids2)
    graph.replay()
    want = triton_experts(x, w13, w2, weights2, ids2, gemv_max_tokens=1)
    assert torch.equal(out, want)


@pytest.mark.parametrize("tokens", [1, 64, 8192])
def test_fused_moe_qwen3_30b_shape(tokens):
    """Qwen3-30B-A3B's expert shapes: hidden 2048, moe_intermediate 768, 128 experts, top-8."""
    check_experts("cuda", torch.bfloat16, tokens, 128, 8, hidden=2048, inter=768)


def check_routing(device: str, tokens: int, experts: int, top_k: int, renormalize: bool,
                  dtype: torch.dtype = torch.float32) -> None:
    """Same experts (as sets: the order of near-equal probabilities may differ) and weights."""
    gen = torch.Generator().manual_seed(tokens * 31 + experts + top_k)
    logits = (3 * torch.randn(tokens, experts, generator=gen)).to(device, dtype)
    weights, ids = triton_select_experts(logits, top_k, renormalize)
    ref_w, ref_i = torch_select_experts(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (tokens, top_k)
    assert (weights[:, :-1] >= weights[:, 1:]).all()  # descending, as torch.topk
    assert (ids.sort(dim=1).values == ref_i.sort(dim=1).values).all()
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experts,top_k", [(8, 1), (8, 2), (60, 4), (64, 6), (128, 8),
                                           (8, 8), (256, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 3000])
def test_routing_kernel_matches_torch(experts, top_k, renormalize, tokens):
    check_routing("cuda", tokens, experts, top_k, renormalize)


def test_routing_kernel_bf16_logits_and_ties():
    check_routing("cuda", 50, 128, 8, True, dtype=torch.bfloat16)
    logits = torch.zeros(4, 16, device="cuda")  # all tied: lowest indices first
    weights, ids = triton_select_experts(logits, 3, renormalize=True)
    assert (ids == torch.arange(3, device="cuda")).all()
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))


def check_routing_non_finite(device: str) -> None:
    """Rows with NaN / inf logits (e.g. a captured batch's padded rows) still pick k
    distinct real experts: an index past them would fault the alignment's scatter."""
    logits = torch.randn(4, 16).to(device)
    logits[0] = float("nan")
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    for renormalize in (True, False):
        weights, ids = triton_select_experts(logits, 4, renormalize)
        assert ((ids >= 0) & (ids < 16)).all(), ids
        assert all(len(set(row.tolist())) == 4 for row in ids.cpu())
        assert torch.isfinite(weights).all()
        ref_w, ref_i = torch_select_experts(logits[3:], 4, renormalize)  # finite row: as torch
        assert (ids[3:].sort(dim=1).values == ref_i.sort(dim=1).values).all()
        torch.testing.assert_close(weights[3:], ref_w, rtol=1e-5, atol=1e-6)


def test_routing_kernel_non_finite_logits():
    check_routing_non_finite("cuda")


def check_router_one_token(device: str, experts: int, top_k: int, renormalize: bool,
                           hidden: int, dtype: torch.dtype, launches: int = 3) -> None:
    """The router product and the selection in one launch: the experts of select_experts on
    the router linear's logits (as sets, weights within float32 rounding of the logits'
    dtype), over `launches` launches on one scratch (its counter back to zero each time)."""
    from pagedllm.models.layers.fused_moe.triton_routing import (
        RouterScratch,
        router_topk_one_token,
    )

    gen = torch.Generator().manual_seed(experts * 7 + top_k + hidden)
    w = (torch.randn(experts, hidden, generator=gen) / hidden ** 0.5).to(device, dtype)
    scratch = RouterScratch(experts, dtype, torch.device(device))
    for _ in range(launches):
        x = (3 * torch.randn(1, hidden, generator=gen)).to(device, dtype)
        weights, ids = router_topk_one_token(x, w, top_k, renormalize, scratch)
        assert int(scratch.count.item()) == 0
        logits = (x.float() @ w.float().t()).to(dtype)
        ref_w, ref_i = torch_select_experts(logits, top_k, renormalize)
        assert weights.shape == ids.shape == (1, top_k) and ids.dtype == torch.int64
        assert (weights[:, :-1] >= weights[:, 1:]).all()
        assert (ids.sort(dim=1).values == ref_i.sort(dim=1).values).all(), (ids, ref_i)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # a logit one rounding step apart
        torch.testing.assert_close(weights, ref_w, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="one token"):
        router_topk_one_token(torch.zeros(2, hidden, device=device, dtype=dtype), w, top_k,
                              renormalize, scratch)


@pytest.mark.parametrize("experts,top_k,hidden", [(128, 8, 2048), (8, 2, 4096), (60, 4, 2048),
                                                  (8, 1, 200), (256, 8, 7168)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_one_token_matches_select_experts(experts, top_k, hidden, renormalize):
    check_router_one_token("cuda", experts, top_k, renormalize, hidden, torch.float32)
    check_router_one_token("cuda", experts, top_k, renormalize, hidden, torch.bfloat16)


def test_moe_layer_one_token_router_in_cuda_graph():
    """FusedMoE.forward_with_router at one token: captured once, replayed on new inputs, the
    output of forward(x, x W^T) (the fused router's launch inside the graph)."""
    from pagedllm.models.layers.fused_moe import FusedMoE

    layer = FusedMoE(128, 8, 256, 64, renormalize=True).to("cuda", torch.bfloat16)
    layer.w13_weight.data.normal_(0, 0.05)
    layer.w2_weight.data.normal_(0, 0.05)
    router = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16) / 16
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    layer.forward_with_router(x, router)  # warm-up: compiles, makes the scratch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.forward_with_router(x, router)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref = layer(x, torch.nn.functional.linear(x, router))
        assert _rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("tokens", [5, 700])
def test_fused_moe_float32(tokens):
    check_experts("cuda", torch.float32, tokens, 16, 2)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [
    (1, 8, 1, 16), (1, 128, 8, 16), (8, 128, 8, 16), (5, 60, 4, 16),  # one-program path
    (9, 8, 8, 16), (37, 16, 4, 16), (300, 60, 4, 64), (1000, 128, 8, 64), (2048, 128, 8, 16),
    (4096, 256, 8, 128), (16384, 128, 8, 128), (3000, 384, 8, 64)])
def test_alignment(tokens, experts, top_k, block_m):
    check_alignment("cuda", tokens, experts, top_k, block_m)


@pytest.mark.parametrize("tokens", [1, 8])
def test_fused_moe_in_cuda_graph(tokens):
    """Routing, sorting and both GEMMs replay from a captured graph with new inputs."""
    x, w13, w2, weights, ids = _case("cuda", torch.bfloat16, tokens, 64, 8, 256, 128)
    logits = torch.randn(tokens, 64, device="cuda")

    def step():
        w, i = select_experts(logits, 8, renormalize=True)
        return triton_experts(x, w13, w2, w, i)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    logits.copy_(torch.randn(tokens, 64, device="cuda"))
    x.copy_(torch.randn_like(x))
    graph.replay()
    w, i = select_experts(logits, 8, renormalize=True)
    assert _rel_err(out, torch_experts(x, w13, w2, w, i)) < 1e-2


@pytest.mark.parametrize("tokens", [3, 100])
def test_moe_layer_dispatches_to_triton_on_cuda(monkeypatch, tokens):
    from pagedllm.models.layers.fused_moe import FusedMoE, experts
    layer = FusedMoE(16, 2, 128, 64, renormalize=False).to("cuda", torch.bfloat16)
    layer.w13_weight.data.normal_(0, 0.05)
    layer.w2_weight.data.normal_(0, 0.05)
    x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(tokens, 16, device="cuda")
    calls = []
    real = experts.torch_experts
    monkeypatch.setattr(experts, "torch_experts", lambda *a: calls.append(1) or real(*a))
    out = layer(x, logits)
    assert not calls  # the Triton path ran
    w, i = torch_select_experts(logits, 2, renormalize=False)
    assert _rel_err(out, real(x, layer.w13_weight, layer.w2_weight, w, i)) < 1e-2


def check_sum_expert_rows(device: str, dtype: torch.dtype, tokens: int, top_k: int,
                          hidden: int) -> None:
    from pagedllm.models.layers.fused_moe.triton_moe import sum_expert_rows

    gen = torch.Generator().manual_seed(tokens * 31 + top_k)
    down = torch.randn(tokens * top_k, hidden, generator=gen).to(device, dtype)
    out = torch.empty(tokens, hidden, dtype=dtype, device=device)
    got = sum_expert_rows(down, top_k, out)
    want = down.float().view(tokens, top_k, hidden).sum(dim=1).to(dtype)
    assert got.data_ptr() == out.data_ptr()
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # float32: summation order only
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (tokens, top_k)


@pytest.mark.parametrize("tokens,top_k,hidden", [(1, 8, 2048), (7, 2, 4096), (300, 4, 1000)])
def test_sum_expert_rows_matches_torch(tokens: int, top_k: int, hidden: int) -> None:
    check_sum_expert_rows("cuda", torch.bfloat16, tokens, top_k, hidden)


def run_interpreter_smoke() -> int:
    """Small cases on the CPU (needs TRITON_INTERPRET=1 before triton is imported). Not
    bf16: the interpreter of triton 3.9 multiplies bf16 tiles in tl.dot wrongly (a plain
    16x16 bf16 dot is off by 1e10 there), so bf16 is covered on the GPU only."""
    check_sum_expert_rows("cpu", torch.float32, 3, 8, 100)
    check_moe_gemv("cpu", torch.float32, 16, 4, 96, 40)
    check_moe_gemv("cpu", torch.float16, 8, 2, 64, 32)
    check_moe_gemv("cpu", torch.float32, 8, 1, 50, 24)  # K not a multiple of 8
    check_moe_gemv("cpu", torch.float32, 16, 6, 64, 40)  # top-k not a power of two
    check_routing_non_finite("cpu")
    check_router_one_token("cpu", 16, 4, True, 96, torch.float32)
    check_router_one_token("cpu", 8, 2, False, 40, torch.float16)  # hidden under one VEC tile
    check_sum_expert_rows("cpu", torch.float16, 2, 2, 1500)
    check_alignment("cpu", 37, 16, 4, 16)
    check_alignment("cpu", 1, 128, 8, 16)
    check_alignment("cpu", 8, 60, 8, 16)
    check_alignment("cpu", 3, 8, 2, 16)
    check_alignment("cpu", 300, 128, 8, 64)  # 3 programs of the three-launch path
    check_alignment("cpu", 300, 8, 2, 16)  # runs of 5 blocks
    check_alignment("cpu", 1500, 16, 2, 16)  # a run over several chunks
    for dtype in (torch.float32, torch.float16):
        check_experts("cpu", dtype, 1, 8, 2, hidden=32, inter=16)
        check_experts("cpu", dtype, 20, 8, 8, hidden=48, inter=32)
        check_experts("cpu", dtype, 70, 16, 1, hidden=32, inter=16)
    for experts, top_k, renormalize in [(8, 2, True), (60, 4, False), (128, 8, True)]:
        check_routing("cpu", 5, experts, top_k, renormalize)
    print("MOE_INTERPRETER_OK")
    return 0


if __name__ == "__main__":
    sys.exit(run_interpreter_smoke())
