"""MoE kernels on one GPU: routing (torch vs one Triton kernel), the grouped GEMM and its tiles.

Qwen3-30B-A3B's expert shapes (128 experts, top-8, hidden 2048, moe_intermediate 768),
bf16, several layers' weights in turn so that L2 holds none of them, each variant captured
in a CUDA graph (as decode runs) and timed per layer. Prints microseconds per layer and the
bandwidth of the expert weights read (distinct experts x their bytes / time), for:
  - routing: torch (softmax, topk, renormalize) vs the one-kernel Triton routing; at one
    token also the router's product + routing (cuBLAS, then Triton) vs the one launch of
    `router_topk_one_token`;
  - above 64 pairs, the alignment's torch ops (the reference) vs its three Triton kernels;
  - the experts' grouped GEMM (`triton_moe`) at its default tiles, and at one token the
    one-token GEMV path (`moe_gemv`; with --gemv-sweep under each of GEMV_CONFIGS);
  - at --gemm-tokens, the grouped GEMM under each of GEMM_CONFIGS.

    python benchmarks/moe_kernels.py [--tokens 1 2 4 8] [--layers 16] [--gemm-tokens 1 8]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagedllm.models.layers.fused_moe import triton_moe  # noqa: E402
from pagedllm.models.layers.fused_moe.reference import torch_align_tokens  # noqa: E402
from pagedllm.models.layers.fused_moe.routing import torch_select_experts  # noqa: E402
from pagedllm.models.layers.fused_moe.triton_moe import align_tokens, triton_experts  # noqa: E402
from pagedllm.models.layers.fused_moe.triton_routing import (  # noqa: E402
    RouterScratch,
    router_topk_one_token,
    triton_select_experts,
)


def graph_time_us(fn: Callable[[int], None], layers: int, reps: int = 20) -> float:
    """Microseconds per layer of fn(layer) over all layers, replayed from one CUDA graph."""
    for i in range(layers):  # compile outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * layers)


def bench_tokens(T: int, args: argparse.Namespace, w13: list[torch.Tensor],
                 w2: list[torch.Tensor]) -> None:
    """Routing (torch vs Triton) and the experts' grouped GEMM at T tokens."""
    dev, dtype = "cuda", torch.bfloat16
    E, k, H, inter, L = args.experts, args.top_k, args.hidden, args.inter, args.layers
    x = torch.randn(T, H, device=dev, dtype=dtype)
    logits = [torch.randn(T, E, device=dev, dtype=dtype) for _ in range(L)]
    routes = [torch_select_experts(lg, k, True) for lg in logits]
    distinct = sum(len(set(r[1].reshape(-1).tolist())) for r in routes) / L
    mb = distinct * (3 * inter * H) * 2 / 1e6
    torch_us = graph_time_us(lambda i: torch_select_experts(logits[i], k, True), L)
    triton_us = graph_time_us(lambda i: triton_select_experts(logits[i], k, True), L)
    experts_us = graph_time_us(
        lambda i: triton_experts(x, w13[i], w2[i], *routes[i], gemv_max_tokens=0), L)
    line = (f"{T} token(s), {distinct:.1f} distinct experts per layer ({mb:.1f} MB): routing "
            f"torch {torch_us:.2f} us, Triton {triton_us:.2f} us; experts (grouped GEMM) "
            f"{experts_us:.2f} us = {mb / experts_us:.2f} TB/s")
    if T * k > triton_moe._SMALL_PAIRS:  # the torch ops' alignment against the kernels'
        block_m = triton_moe._config(T * k)["BLOCK_M"]
        ops_us = graph_time_us(lambda i: torch_align_tokens(routes[i][1], E, block_m), L)
        kernel_us = graph_time_us(lambda i: align_tokens(routes[i][1], E, block_m), L)
        line += f"; alignment torch ops {ops_us:.2f} us, three kernels {kernel_us:.2f} us"
    if T == 1:
        gemv_us = graph_time_us(
            lambda i: triton_experts(x, w13[i], w2[i], *routes[i], gemv_max_tokens=1), L)
        line += f"; experts (one-token GEMV) {gemv_us:.2f} us = {mb / gemv_us:.2f} TB/s"
        routers = [torch.randn(E, H, device=dev, dtype=dtype) / H ** 0.5 for _ in range(L)]
        scratch = [RouterScratch(E, dtype, x.device) for _ in range(L)]
        two_us = graph_time_us(lambda i: triton_select_experts(
            torch.nn.functional.linear(x, routers[i]), k, True), L)
        one_us = graph_time_us(
            lambda i: router_topk_one_token(x, routers[i], k, True, scratch[i]), L)
        line += (f"; router + routing: cuBLAS + Triton {two_us:.2f} us, one launch "
                 f"{one_us:.2f} us")
    print(line)
    if T == 1 and args.gemv_sweep:
        sweep_gemv(x, routes, w13, w2, mb, L)


GEMV_CONFIGS = [  # overrides of triton_moe.GEMV_CONFIG
    dict(UP_BLOCK_N=2, UP_BLOCK_K=512, DOWN_BLOCK_N=2),  # the tiles before
    dict(UP_BLOCK_N=2), dict(UP_BLOCK_K=512), dict(UP_BLOCK_K=1024), dict(DOWN_BLOCK_N=2),
    dict(DOWN_BLOCK_N=4), dict(DOWN_BLOCK_K=512), dict(DOWN_BLOCK_K=1024),
    dict(num_warps=8), dict(num_warps=2), dict(VEC=4), dict(VEC=8)]


def sweep_gemv(x: torch.Tensor, routes: list, w13: list[torch.Tensor],
               w2: list[torch.Tensor], mb: float, layers: int) -> None:
    """The one-token GEMV under each of GEMV_CONFIGS (the default's first)."""
    found = []
    out = torch.empty_like(x)
    for cfg in [{}, *GEMV_CONFIGS]:
        try:
            us = graph_time_us(lambda i, cfg=cfg: triton_moe.moe_gemv(
                x, w13[i], w2[i], *routes[i], out, cfg), layers)
        except Exception as e:  # a tile the compiler refuses
            print(f"one-token GEMV {cfg}: {type(e).__name__}")
            continue
        found.append((us, str(cfg) if cfg else "default"))
        print(f"one-token GEMV {cfg or 'default'}: {us:.2f} us = {mb / us:.2f} TB/s")
    found.sort()
    print("one-token GEMV best: " + "; ".join(f"{name} {us:.2f} us" for us, name in found[:3]))


GEMM_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
    (16, 16, 256, 1, 2, 4), (16, 32, 256, 1, 4, 3), (16, 32, 128, 1, 2, 5),
    (16, 64, 256, 1, 4, 3), (16, 128, 128, 1, 4, 4),
    (16, 64, 128, 1, 4, 4), (32, 64, 128, 1, 4, 4), (32, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 128, 128, 8, 8, 3),
    (64, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3),
    (128, 128, 128, 8, 8, 3), (128, 64, 64, 8, 4, 4)]


def sweep_grouped_gemm(T: int, args: argparse.Namespace, w13: list[torch.Tensor],
                       w2: list[torch.Tensor]) -> None:
    """The grouped GEMM at T tokens under each of GEMM_CONFIGS (the default's first)."""
    E, k, H, inter, L = args.experts, args.top_k, args.hidden, args.inter, args.layers
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    routes = [torch_select_experts(torch.randn(T, E, device="cuda"), k, True)
              for _ in range(L)]
    flops = 2 * T * k * (2 * inter * H + H * inter)
    distinct = sum(len(set(r[1].reshape(-1).tolist())) for r in routes) / L
    nbytes = distinct * (3 * inter * H) * 2 + T * H * 2 * (1 + k)
    default = triton_moe._config(T * k)
    found = []
    for cfg in [None, *GEMM_CONFIGS]:
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
        chosen = default if cfg is None else dict(zip(keys, cfg))
        real = triton_moe._config
        triton_moe._config = lambda n, chosen=chosen: chosen
        try:
            us = graph_time_us(lambda i: triton_experts(x, w13[i], w2[i], *routes[i],
                                                        gemv_max_tokens=0), L, reps=5)
        except Exception as e:  # a tile the compiler or the SM's memory refuses
            print(f"grouped GEMM T={T} {chosen}: {type(e).__name__}")
            continue
        finally:
            triton_moe._config = real
        found.append((us, "default" if cfg is None else str(cfg)))
    found.sort()
    base = next(us for us, name in found if name == "default")
    print(f"grouped GEMM T={T} ({T * k} pairs): default {tuple(default.values())} "
          f"{base:.1f} us/layer = {flops / base * 1e-6:.0f} TFLOP/s, {nbytes / base * 1e-6:.2f}"
          f" TB/s; best: " + "; ".join(f"{name} {us:.1f} us" for us, name in found[:3]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 64, 256, 1024])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--gemm-tokens", type=int, nargs="*", default=[1, 8, 64, 256, 8192],
                    help="token counts at which to sweep the grouped GEMM's tiles")
    ap.add_argument("--gemv-sweep", action="store_true",
                    help="at one token, also time the GEMV under each of GEMV_CONFIGS")
    args = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    E, k, H, inter, L = args.experts, args.top_k, args.hidden, args.inter, args.layers
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; E={E} top-{k} H={H} I={inter}, {L} layers in turn")
    w13 = [torch.randn(E, 2 * inter, H, device=dev, dtype=dtype) * 0.02 for _ in range(L)]
    w2 = [torch.randn(E, H, inter, device=dev, dtype=dtype) * 0.02 for _ in range(L)]
    for T in args.tokens:
        bench_tokens(T, args, w13, w2)
    for T in args.gemm_tokens:
        sweep_grouped_gemm(T, args, w13, w2)


if __name__ == "__main__":
    main()
