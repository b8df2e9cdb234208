"""Microbenchmark of the TRITON_ATTN decode kernel (and, with --prefill, the prefill kernel).

Default shape: batch 64, 4k context, Llama-3-8B attention (32 q heads, 8 kv heads, head_dim
128), bf16, block_size 16, blocks scattered randomly over the cache. Reports the median time
(triton.testing.do_bench, plain launches and CUDA-graph replays), bytes moved (K+V read,
q read, out written), achieved GB/s and its fraction of a measured device-to-device copy
(bytes read + written).

    python benchmarks/kernel_decode.py [--sweep] [--prefill]
    python benchmarks/kernel_decode.py --forms --batch 256 --ctx 384   # bf16 against FP8 caches
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagedllm.attention.ops.triton_decode_attention import decode_attention  # noqa: E402
from pagedllm.attention.ops.triton_prefill_attention import prefill_attention  # noqa: E402


def bench(fn: Callable[[], object], graph: bool = False, reps: int = 10) -> float:
    """Median milliseconds of one fn() call; with graph=True, of one call inside a graph."""
    if not graph:
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(reps):
                fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median") / reps


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a large device-to-device torch copy, counting bytes read + written."""
    src = torch.randn(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_decode(args: argparse.Namespace, copy_gbs: float) -> list[tuple[str, float, float]]:
    """Time the decode kernel; returns rows (label, ms, GB/s)."""
    batch, ctx, hq, hkv, d, bs = args.batch, args.ctx, 32, 8, 128, 16
    dtype = torch.bfloat16
    blocks_per_req = math.ceil(ctx / bs)
    num_blocks = batch * blocks_per_req
    kv_cache = torch.randn(2, num_blocks, bs, hkv, d, device="cuda", dtype=dtype)
    block_table = (
        torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_req)
    )
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
    out = torch.empty_like(query)
    scale = d**-0.5
    elt = kv_cache.element_size()
    nbytes = 2 * batch * ctx * hkv * d * elt + 2 * query.numel() * elt
    ref = decode_attention(query, kv_cache, block_table, seq_lens, scale).clone()

    configs: list[dict[str, int | None]] = [{}]
    if args.sweep:
        for bn, w, st in [(32, 2, 4), (32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3),
                          (128, 8, 3)]:
            for splits in (1, 2, 4):
                configs.append(dict(block_n=bn, num_warps=w, num_stages=st, num_splits=splits))
    rows = []
    for cfg in configs:
        def fn(cfg: dict = cfg) -> torch.Tensor:
            return decode_attention(query, kv_cache, block_table, seq_lens, scale, out=out, **cfg)

        try:
            out.fill_(float("nan"))
            fn()
            err = rel_err(out, ref)
            ms = bench(fn)
        except Exception as exc:
            print(f"config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        label = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
        if err > 1e-2:
            label += f" WRONG(err={err:.1e})"
        rows.append((label, ms, nbytes / ms / 1e6))
    graph_ms = bench(lambda: decode_attention(query, kv_cache, block_table, seq_lens, scale,
                                              out=out), graph=True)
    rows.insert(1, ("default (cuda graph)", graph_ms, nbytes / graph_ms / 1e6))
    print(f"\ndecode: batch {batch}, ctx {ctx}, 32q/8kv heads, d128, bf16, bs16; "
          f"{nbytes / 1e9:.3f} GB moved; copy bandwidth {copy_gbs:.0f} GB/s")
    best = sorted(rows, key=lambda r: r[1])[:8] if args.sweep else rows
    print(f"{'config':58s} {'us':>8s} {'GB/s':>8s} {'of copy':>8s}")
    for label, ms, gbs in rows[:2] + [r for r in best if r not in rows[:2]]:
        print(f"{label:58s} {ms * 1e3:8.1f} {gbs:8.0f} {gbs / copy_gbs:8.1%}")
    return rows


def run_forms(batch: int, ctx: int, copy_gbs: float) -> None:
    """The decode kernel over a bf16 and an FP8 cache (CUDA-graph replays): FP8 with V read
    as 16-bit words (default, and a sweep of tiles) or byte by byte. Errors against the
    bf16 cache's output."""
    hq, hkv, d, bs = 32, 8, 128, 16
    nblk = math.ceil(ctx / bs)
    kv_bf16 = torch.randn(2, batch * nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    kv_fp8 = kv_bf16.to(torch.float8_e4m3fn)
    kv_bf16 = kv_fp8.to(torch.bfloat16)  # the same values in both caches
    table = torch.randperm(batch * nblk, device="cuda").to(torch.int32).view(batch, nblk)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    ref = decode_attention(query, kv_bf16, table, seq_lens, d**-0.5).float()
    print(f"\ndecode forms: batch {batch}, ctx {ctx}, 32q/8kv heads, d128, bs16")
    forms: list[tuple[str, torch.Tensor, dict]] = [
        ("bf16 cache", kv_bf16, {}), ("fp8 cache, V as words", kv_fp8, {}),
        ("fp8 cache, V by bytes", kv_fp8, dict(fp8_words=False))]
    for bn, w, st in [(32, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2),
                      (128, 4, 3), (128, 8, 2), (128, 8, 3)]:
        forms.append((f"fp8 words n{bn} w{w} s{st}", kv_fp8,
                      dict(block_n=bn, num_warps=w, num_stages=st)))
    for label, cache, opts in forms:
        def fn(cache: torch.Tensor = cache, opts: dict = opts) -> torch.Tensor:
            return decode_attention(query, cache, table, seq_lens, d**-0.5, **opts)

        try:
            err = rel_err(fn().float(), ref)
            ms = bench(fn, graph=True)
        except Exception as exc:
            print(f"{label} failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        nbytes = 2 * batch * ctx * hkv * d * cache.element_size() + 4 * query.numel()
        gbs = nbytes / ms / 1e6
        print(f"{label:28s} {ms * 1e3:8.1f} us {gbs:8.0f} GB/s {gbs / copy_gbs:7.1%} of copy"
              f"  err {err:.1e}")


def run_split_sweep(batch: int, ctx: int, copy_gbs: float) -> None:
    """Time the default split count against fixed ones at a small batch."""
    hq, hkv, d, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    nblk = math.ceil(ctx / bs)
    kv_cache = torch.randn(2, batch * nblk, bs, hkv, d, device="cuda", dtype=dtype)
    block_table = torch.randperm(batch * nblk, device="cuda").to(torch.int32).view(batch, nblk)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
    nbytes = 2 * batch * ctx * hkv * d * 2 + 4 * query.numel()
    parts = []
    for splits in (None, 1, 2, 4, 8, 16):
        ms = bench(lambda s=splits: decode_attention(query, kv_cache, block_table, seq_lens,
                                                     d**-0.5, num_splits=s), graph=True)
        parts.append(f"{splits or 'default'}:{ms * 1e3:.1f}us/{nbytes / ms / 1e6 / copy_gbs:.0%}")
    print(f"decode batch {batch} ctx {ctx} splits (graph): " + "  ".join(parts))


def run_prefill(args: argparse.Namespace) -> None:
    """Time a causal prefill batch against torch SDPA (flash backend) on contiguous tensors."""
    num_reqs, seq, hq, hkv, d, bs = 4, 4096, 32, 8, 128, 16
    dtype = torch.bfloat16
    tokens = num_reqs * seq
    num_blocks = tokens // bs
    kv_cache = torch.randn(2, num_blocks, bs, hkv, d, device="cuda", dtype=dtype)
    block_table = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    block_table = block_table.view(num_reqs, seq // bs)
    seq_lens = torch.full((num_reqs,), seq, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, tokens + 1, seq, dtype=torch.int32, device="cuda")
    query = torch.randn(tokens, hq, d, device="cuda", dtype=dtype)
    out = torch.empty_like(query)
    scale = d**-0.5
    flops = 4 * num_reqs * (seq * (seq + 1) / 2) * hq * d

    def tri(**cfg: int) -> torch.Tensor:
        return prefill_attention(query, kv_cache, block_table, seq_lens, qsl, num_reqs, tokens,
                                 scale, out=out, **cfg)

    # contiguous K/V in request order for SDPA
    k = kv_cache[0][block_table.long()].reshape(num_reqs, seq, hkv, d).transpose(1, 2)
    v = kv_cache[1][block_table.long()].reshape(num_reqs, seq, hkv, d).transpose(1, 2)
    q = query.view(num_reqs, seq, hq, d).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=True
    )
    ref = ref.transpose(1, 2).reshape(tokens, hq, d)
    rows = []
    configs: list[dict[str, int]] = [{}]
    if args.sweep:
        for bm, bn, w, st in [(128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 4),
                              (256, 64, 8, 3), (256, 128, 8, 2), (64, 128, 4, 3)]:
            configs.append(dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st))
    for cfg in configs:
        try:
            out.fill_(float("nan"))
            tri(**cfg)
            err = rel_err(out, ref)
            ms = bench(lambda cfg=cfg: tri(**cfg))
        except Exception as exc:
            print(f"prefill config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        label = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
        rows.append((f"{label} (err {err:.1e})", ms))
    try:
        sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True))
        rows.append(("torch SDPA (contiguous, non-paged)", sdpa_ms))
    except Exception as exc:
        print(f"SDPA failed: {exc}")
    print(f"\nprefill: {num_reqs} x {seq} tokens causal, 32q/8kv heads, d128, bf16, bs16")
    print(f"{'config':58s} {'us':>8s} {'TFLOP/s':>8s}")
    for label, ms in rows:
        print(f"{label:58s} {ms * 1e3:8.1f} {flops / ms / 1e9:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--sweep", action="store_true", help="also time other kernel configs")
    parser.add_argument("--prefill", action="store_true", help="also time the prefill kernel")
    parser.add_argument("--forms", action="store_true",
                        help="only time the kernel's forms over bf16 and FP8 caches")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    copy_gbs = copy_bandwidth()
    if args.forms:
        run_forms(args.batch, args.ctx, copy_gbs)
        return
    if args.prefill:
        try:
            run_prefill(args)
            for b, c in ((1, 4096), (8, 4096), (16, 8192), (256, 1024)):
                run_split_sweep(b, c, copy_gbs)
        except Exception as exc:
            print(f"prefill benchmark failed: {type(exc).__name__}: {exc}")
    run_decode(args, copy_gbs)


if __name__ == "__main__":
    main()
