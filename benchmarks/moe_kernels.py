"""Decode-sized MoE kernels on one GPU: the grouped GEMM against the GEMV path, tile sweeps.

Qwen3-30B-A3B's expert shapes (128 experts, top-8, hidden 2048, moe_intermediate 768),
bf16, several layers' weights in turn so that L2 holds none of them, each variant captured
in a CUDA graph (as decode runs) and timed per layer. Prints microseconds per layer and the
bandwidth of the expert weights read (distinct experts x their bytes / time), for:
  - routing: torch (softmax, topk, renormalize) vs the one-kernel Triton routing;
  - experts: the grouped-GEMM kernel vs the GEMV path's default tiles;
  - the GEMV kernels' tile sweep (BLOCK_N, BLOCK_K, num_warps), each kernel alone.

    python benchmarks/moe_kernels.py [--tokens 1 2 4 8] [--layers 16] [--sweep-tokens 1 8]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagedllm.models.layers.fused_moe import triton_decode  # noqa: E402
from pagedllm.models.layers.fused_moe.routing import torch_select_experts  # noqa: E402
from pagedllm.models.layers.fused_moe.triton_moe import triton_experts  # noqa: E402
from pagedllm.models.layers.fused_moe.triton_routing import triton_select_experts  # noqa: E402


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
    """Routing, both expert paths and (at --sweep-tokens) the GEMV tile sweep, T tokens."""
    dev, dtype = "cuda", torch.bfloat16
    E, k, H, inter, L = args.experts, args.top_k, args.hidden, args.inter, args.layers
    expert_bytes = (2 * inter * H + H * inter) * 2
    x = torch.randn(T, H, device=dev, dtype=dtype)
    logits = [torch.randn(T, E, device=dev, dtype=dtype) for _ in range(L)]
    routes = [torch_select_experts(lg, k, True) for lg in logits]
    distinct = sum(len(set(r[1].reshape(-1).tolist())) for r in routes) / L
    mb = distinct * expert_bytes / 1e6
    print(f"\n-- {T} token(s): {distinct:.1f} distinct experts per layer, "
          f"{mb:.1f} MB of expert weights")
    rows: list[tuple[str, float, float | None]] = []
    rows.append(("routing torch", graph_time_us(
        lambda i: torch_select_experts(logits[i], k, True), L), None))
    rows.append(("routing triton", graph_time_us(
        lambda i: triton_select_experts(logits[i], k, True), L), None))
    for name, fn in [("experts grouped GEMM", triton_experts),
                     ("experts GEMV path", triton_decode.decode_experts)]:
        us = graph_time_us(lambda i, fn=fn: fn(x, w13[i], w2[i], *routes[i]), L)
        rows.append((name, us, mb / us * 1e-3))
    for name, us, tbs in rows:
        print(f"{name:<28} {us:8.2f} us/layer" + (f"  {tbs:6.2f} TB/s" if tbs else ""))
    if T not in args.sweep_tokens:
        return
    ids = [r[1].reshape(-1).contiguous() for r in routes]
    wts = [r[0].reshape(-1).contiguous() for r in routes]
    act = torch.randn(T * k, inter, device=dev, dtype=dtype)
    out = torch.empty(T, H, device=dev, dtype=dtype)
    gate_up_mb = distinct * 2 * inter * H * 2 / 1e6
    down_mb = distinct * H * inter * 2 / 1e6
    results = {"gate_up": [], "down": []}
    for bn, bk, warps in itertools.product((8, 16, 32, 64), (64, 128, 256, 512), (1, 2, 4, 8)):
        if bn * bk > 16384:
            continue

        def gate_up(i: int, bn: int = bn, bk: int = bk, warps: int = warps) -> None:
            triton_decode._gate_up_kernel[(T * k, triton.cdiv(inter, bn))](
                x, w13[i], ids[i], act, inter, H, x.stride(0), w13[i].stride(0),
                w13[i].stride(1), act.stride(0), TOP_K=k, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps)

        def down(i: int, bn: int = bn, bk: int = bk, warps: int = warps) -> None:
            triton_decode._down_kernel[(T, triton.cdiv(H, bn))](
                act, w2[i], ids[i], wts[i], out, H, inter, act.stride(0), w2[i].stride(0),
                w2[i].stride(1), out.stride(0), TOP_K=k, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps)

        for name, fn, size in [("gate_up", gate_up, gate_up_mb), ("down", down, down_mb)]:
            try:
                us = graph_time_us(fn, L, reps=10)
            except Exception as e:  # a tile the compiler refuses
                print(f"{name} {bn},{bk},{warps}: {type(e).__name__}")
                continue
            results[name].append((us, (bn, bk, warps), size / us * 1e-3))
    for name, found in results.items():
        found.sort()
        default = getattr(triton_decode, f"{name.upper()}_CONFIG")
        base = next((us for us, cfg, _ in found if cfg == default), float("nan"))
        print(f"{name}: default {default} {base:.2f} us; best: " + "; ".join(
            f"{cfg} {us:.2f} us {tbs:.2f} TB/s" for us, cfg, tbs in found[:4]))


GEMM_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
    (16, 64, 128, 1, 4, 4), (32, 64, 128, 1, 4, 4), (32, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 128, 128, 8, 8, 3),
    (64, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3),
    (128, 128, 128, 8, 8, 3), (128, 64, 64, 8, 4, 4)]


def sweep_grouped_gemm(T: int, args: argparse.Namespace, w13: list[torch.Tensor],
                       w2: list[torch.Tensor]) -> None:
    """The grouped GEMM at T tokens under each of GEMM_CONFIGS (the default's first)."""
    from pagedllm.models.layers.fused_moe import triton_moe

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
            us = graph_time_us(lambda i: triton_experts(x, w13[i], w2[i], *routes[i]), L,
                               reps=5)
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
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--sweep-tokens", type=int, nargs="*", default=[1, 8],
                    help="token counts at which to sweep the GEMV tiles")
    ap.add_argument("--gemm-tokens", type=int, nargs="*", default=[64, 256, 512, 8192],
                    help="token counts at which to sweep the grouped GEMM's tiles")
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
