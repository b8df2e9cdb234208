"""Quantized linear kernels against bf16 on one GPU (issue 20): each linear of the
Llama-3-8B shape at M = 1, 8, 64, 256, 4096 rows, for
  bf16        torch (cuBLAS) x @ W^T;
  fp8-mm      per-token quantization + torch._scaled_mm (Fp8Weight's large-M path);
  fp8-mm-fast the same with use_fast_accum; fp8-mm-only: _scaled_mm alone (x quantized
              beforehand, as the norm / SiLU kernels hand it over), fp8-mm-only-fast: the
              same with use_fast_accum (the engine's default on CUDA);
  fp8-gemv    the Triton weight-only GEMV (fp8_gemv; M = 1), its default
              configuration and a few alternatives (the best is printed);
  int4-old    the W4A16 dequant-GEMM of int4_kernels (both its decode and GEMM configs);
  int4-gemv   the W4A16 GEMV (int4_gemv; M = 1), default and alternatives;
  *-gemv+silu the gate_up GEMVs with SiLU-mul fused (the gated kernels, half the output);
  bf16-gemv   the FP8 GEMV's kernel streaming the bf16 weight itself (unit scales; M = 1).
Prints microseconds per call and the achieved GB/s (weight + activation + output bytes)
against the HBM ceiling (--peak-gbs, 4800 for an H200), the path each layer's dispatcher
takes, and an estimate of the linears' time per decoded token at M = 1 (32 layers).

Every size runs as a CUDA graph of many calls (launch gaps as a graph replays them, as
the engine's decode graphs do; the host's launch cost is not timed). Every call of a graph
reads another copy of the weight, so that the copies together exceed the L2 cache (~50 MB)
and each call streams its weight from HBM as a model's layers do.

  python benchmarks/quant_kernels.py [--json out.json] [--m 1 8 64 256 4096]
  TRITON_INTERPRET=1 python benchmarks/quant_kernels.py --dry-run   # plumbing, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
import triton

from pagedllm.quantization.fp8 import Fp8Weight, quantize_rows, quantize_tokens, scaled_mm_mode
from pagedllm.quantization.fp8 import _mm as scaled_mm
from pagedllm.quantization.fp8_gemv import SMALL_M_MAX, fp8_gemv, fp8_gemv_config
from pagedllm.quantization.gemv_split import GemvScratch
from pagedllm.quantization.int4 import Int4Weight
from pagedllm.quantization.int4_gemv import int4_gemv, int4_gemv_config
from pagedllm.quantization.int4_kernels import int4_matmul

LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
           "down": (4096, 14336)}  # name: (N out, K in), Llama-3-8B
# Qwen3-30B-A3B's attention projections and router (its batch-1 decode reads them through
# cuBLAS at ~1.9 TB/s): selectable with --linears, not in the per-token summary
MOE_LINEARS = {"a3b_qkv": (5120, 2048), "a3b_o": (2048, 4096), "a3b_router": (128, 2048)}
DRY_RUN_LINEARS = {"qkv": (96, 256), "o": (64, 256), "gate_up": (448, 256),
                   "down": (64, 512)}  # --dry-run: tiny shapes under the Triton interpreter
LAYERS = 32
L2_BYTES = 50 * 2**20
GROUP = 128
FP8_ALTERNATIVES = tuple(  # whole tile configurations (VEC, BLOCK_N, BLOCK_K[, warps])
    dict(VEC=v, BLOCK_N=bn, BLOCK_K=bk, **({"num_warps": w} if w else {}))
    for v, bn, bk, w in ((1, 8, 1024, 0), (1, 4, 2048, 0), (1, 16, 512, 0), (16, 4, 1024, 0),
                         (16, 4, 2048, 0), (16, 4, 4096, 0), (16, 2, 2048, 0),
                         (16, 2, 4096, 0), (16, 4, 2048, 8), (32, 4, 2048, 0),
                         (16, 8, 2048, 2)))
FP8_GATED_ALTERNATIVES = tuple(
    dict(VEC=v, BLOCK_N=bn, BLOCK_K=bk)
    for v, bn, bk in ((1, 8, 512), (1, 4, 1024), (16, 4, 512), (16, 4, 1024), (16, 4, 2048),
                      (16, 2, 1024), (16, 2, 2048), (32, 4, 1024)))
INT4_ALTERNATIVES = ({"BLOCK_N": 16, "BLOCK_K": 1024}, {"BLOCK_N": 64, "BLOCK_K": 256},
                     {"BLOCK_N": 128, "BLOCK_K": 128}, {"BLOCK_N": 32, "BLOCK_K": 256},
                     {"BLOCK_N": 32, "BLOCK_K": 1024}, {"BLOCK_N": 64, "BLOCK_K": 64},
                     {"num_warps": 4}, {"num_warps": 16},
                     {"split": 2}, {"split": 8})


def _time_graph(calls: list[Callable[[], object]], reps: int) -> float:
    """Microseconds per call: `calls` (one per weight copy) captured `reps` times in one
    CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    del graph
    return 1000.0 * ms / (3 * reps * len(calls))


def _time(make: Callable[[int], Callable[[], object]], copies: int, m: int) -> float:
    """Microseconds per call of make(copy)() (see the module docstring; on the CPU one
    timed call, for --dry-run)."""
    calls = [make(i) for i in range(copies)]
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        calls[0]()
        return 1e6 * (time.perf_counter() - t0)
    return _time_graph(calls, max(1, (240 if m <= 16 else 24) // copies))


class _Weights:
    """Random weights of one linear in every format, `copies` of each (L2 avoidance)."""

    def __init__(self, n: int, k: int, mode: str, dev: torch.device,
                 dtype: torch.dtype, gated: bool = False) -> None:
        self.n, self.k, self.mode, self.dtype = n, k, mode, dtype
        self.gated = gated
        dense = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        codes, scale = quantize_rows(dense)
        self.fp8_layer = Fp8Weight(codes, scale, dtype, mode)
        int4_codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
        zeros = torch.full((n, k // GROUP), 8, device=dev, dtype=torch.uint8)
        scales = torch.full((n, k // GROUP), 1e-3, device=dev, dtype=torch.float16)
        self.int4_layer = Int4Weight(int4_codes, zeros, scales, None, dtype)
        del int4_codes
        f, q = self.fp8_layer, self.int4_layer
        self.bytes = {"bf16": dense.numel() * 2, "fp8": f.nbytes, "int4": q.nbytes}
        self.copies = {fmt: max(1, math.ceil(3 * L2_BYTES / b)) for fmt, b in self.bytes.items()}
        self.bf16 = [dense] + [dense.clone() for _ in range(self.copies["bf16"] - 1)]
        self.fp8 = [(f.codes, f.scale)] + [(f.codes.clone(), f.scale.clone())
                                           for _ in range(self.copies["fp8"] - 1)]
        self.int4 = [(q.qweight, q.scales, q.zeros)] + [
            (q.qweight.clone(), q.scales.clone(), q.zeros.clone())
            for _ in range(self.copies["int4"] - 1)]


def _paths(w: _Weights, x: torch.Tensor, m: int, alternatives: bool
           ) -> dict[str, tuple[str, Callable]]:
    """name -> (weight format, make(copy) -> call)."""
    paths: dict[str, tuple[str, Callable]] = {
        "bf16": ("bf16", lambda i: lambda: torch.matmul(x, w.bf16[i].t())),
        "fp8-mm": ("fp8", lambda i: lambda: _fp8_mm(w.mode, *w.fp8[i], x, w.dtype)),
        "fp8-mm-fast": ("fp8", lambda i: lambda: _fp8_mm(w.mode, *w.fp8[i], x, w.dtype, True)),
        "fp8-mm-only": ("fp8", _fp8_mm_only(w, x)),
        "fp8-mm-only-fast": ("fp8", _fp8_mm_only(w, x, fast_accum=True)),
        "int4-old": ("int4", lambda i: lambda: int4_matmul(x, *w.int4[i], GROUP)),
    }
    if m <= SMALL_M_MAX:
        ones = torch.ones(1, w.n, device=x.device)  # the bf16 weight streamed as it is
        for vec in (8, 16):
            cfg = {**fp8_gemv_config(m, w.n, w.k, _sms()), "VEC": vec}
            paths[f"bf16-gemv/VEC={vec}"] = ("bf16", _fp8_call(
                w, x, cfg, weights=[(dense, ones) for dense in w.bf16]))
        fp8_alts = ({},) + (FP8_ALTERNATIVES if alternatives else ())
        base = fp8_gemv_config(m, w.n, w.k, _sms())
        for alt in fp8_alts:
            name = "fp8-gemv" + (f"/{_label(alt)}" if alt else "")
            paths[name] = ("fp8", _fp8_call(w, x, {**base, **alt}))
        int4_alts = ({},) + (INT4_ALTERNATIVES if alternatives else ())
        base = int4_gemv_config(m, w.n, w.k, GROUP, _sms())
        for alt in int4_alts:
            name = "int4-gemv" + (f"/{_label(alt)}" if alt else "")
            paths[name] = ("int4", _int4_call(w, x, {**base, **alt}))
        if w.n % 2 == 0 and w.gated:  # the gate / up weight: the GEMV with SiLU-mul fused
            paths["fp8-gemv+silu"] = ("fp8", _fp8_call(
                w, x, fp8_gemv_config(m, w.n, w.k, _sms(), True), gated=True))
            gated4 = int4_gemv_config(m, w.n, w.k, GROUP, _sms(), True)
            paths["int4-gemv+silu"] = ("int4", _int4_call(w, x, gated4, gated=True))
            for alt in ({"BLOCK_N": 32, "BLOCK_K": 256}, {"BLOCK_N": 16, "BLOCK_K": 1024},
                        {"BLOCK_N": 8, "BLOCK_K": 1024}, {"num_warps": 4},
                        {"num_warps": 16}):
                paths[f"int4-gemv+silu/{_label(alt)}"] = ("int4", _int4_call(
                    w, x, {**gated4, **alt}, gated=True))
            gated8 = fp8_gemv_config(m, w.n, w.k, _sms(), True)
            for alt in FP8_GATED_ALTERNATIVES:
                paths[f"fp8-gemv+silu/{_label(alt)}"] = ("fp8", _fp8_call(
                    w, x, {**gated8, **alt}, gated=True))
    return paths


def _fp8_mm(mode: str, codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
            dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    xq, sx = quantize_tokens(x)
    return scaled_mm(mode, xq, codes, sx, scale, dtype, fast_accum)


def _fp8_mm_only(w: _Weights, x: torch.Tensor, fast_accum: bool = False) -> Callable:
    """_scaled_mm on activations quantized once beforehand: the GEMM without the
    quantization launch (what the norm / SiLU kernels' FP8 outputs leave)."""
    xq, sx = quantize_tokens(x)
    return lambda i: lambda: scaled_mm(w.mode, xq, w.fp8[i][0], sx, w.fp8[i][1], w.dtype,
                                       fast_accum)


def _fp8_call(w: _Weights, x: torch.Tensor, cfg: dict, gated: bool = False,
              weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Callable:
    """fp8_gemv over copy i of `weights` ((codes, scales) pairs; default the FP8 copies)."""
    weights = w.fp8 if weights is None else weights
    scratch = _scratch(w, cfg, gated, x.device)
    return lambda i: lambda: fp8_gemv(x, *weights[i], w.dtype, cfg, gated, scratch)


def _int4_call(w: _Weights, x: torch.Tensor, cfg: dict, gated: bool = False) -> Callable:
    scratch = _scratch(w, cfg, gated, x.device)
    return lambda i: lambda: int4_gemv(x, *w.int4[i], GROUP, cfg, gated, scratch)


def _scratch(w: _Weights, cfg: dict, gated: bool, device: torch.device) -> GemvScratch:
    """One split scratch per configuration, made before timing (as a model's weight makes
    its own at load): the timed launches allocate nothing."""
    tiles = math.ceil((w.n // 2 if gated else w.n) / cfg["BLOCK_N"])
    return GemvScratch(max(cfg["split"], 1), w.n, tiles, device)


def _label(alt: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in alt.items())


def _sms() -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(0).multi_processor_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 64, 256, 4096])
    ap.add_argument("--linears", nargs="+", default=list(LINEARS),
                    choices=list(LINEARS) + list(MOE_LINEARS))
    ap.add_argument("--peak-gbs", type=float, default=4800.0)
    ap.add_argument("--no-alternatives", action="store_true",
                    help="only the default configurations of the skinny GEMMs")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU in fp16 (run with TRITON_INTERPRET=1)")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float16 if args.dry_run else torch.bfloat16  # interpreter: no bf16 dot
    linears = DRY_RUN_LINEARS if args.dry_run else {**LINEARS, **MOE_LINEARS}
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    mode = scaled_mm_mode(dev, dtype)
    print(f"{device_name}, {_sms()} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}, _scaled_mm mode {mode}", flush=True)
    rows = []
    best: dict[tuple[str, int, str], float] = {}
    for name in args.linears:
        n, k = linears[name]
        w = _Weights(n, k, mode, dev, dtype, gated=name == "gate_up")
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            act_bytes = m * k * 2 + m * n * 2
            for path, (fmt, make) in _paths(w, x, m, not args.no_alternatives).items():
                try:
                    us = _time(make, w.copies[fmt], m)
                except Exception as e:  # a configuration that does not compile / fit
                    print(f"{name:<8} M={m:<5} {path:<40} failed: {str(e).splitlines()[0]}",
                          flush=True)
                    continue
                gbs = (w.bytes[fmt] + act_bytes) / us / 1e3
                rows.append(dict(linear=name, m=m, path=path, us=us, gbs=gbs))
                print(f"{name:<8} M={m:<5} {path:<40} {us:9.2f} us {gbs:8.0f} GB/s "
                      f"{100 * gbs / args.peak_gbs:5.1f}% of peak", flush=True)
                family = path.split("/")[0]
                key = (name, m, family)
                best[key] = min(best.get(key, math.inf), us)
            fp8_path = w.fp8_layer.path(m, True)
            int4_path = w.int4_layer.path(m, True)
            print(f"{name:<8} M={m:<5} dispatch: fp8 -> {fp8_path}, int4 -> {int4_path}",
                  flush=True)
        del w
        if not args.dry_run:
            torch.cuda.empty_cache()
    summary = {}
    if 1 in args.m and len(args.linears) == len(LINEARS):
        def per_token(families: tuple[str, ...]) -> float:
            return LAYERS * sum(min(best.get((lin, 1, f), math.inf) for f in families)
                                for lin in LINEARS) / 1000.0
        summary = {
            "bf16 linears ms/token (M=1)": per_token(("bf16",)),
            "fp8 default (gemv) ms/token": LAYERS * sum(
                next((r["us"] for r in rows if r["linear"] == lin and r["m"] == 1
                      and r["path"] == "fp8-gemv"), math.inf) for lin in LINEARS) / 1000.0,
            "fp8 best of all paths ms/token": per_token(("fp8-gemv", "fp8-mm")),
            "fp8-mm ms/token": per_token(("fp8-mm",)),
            "int4 default (gemv) ms/token": LAYERS * sum(
                next((r["us"] for r in rows if r["linear"] == lin and r["m"] == 1
                      and r["path"] == "int4-gemv"), math.inf) for lin in LINEARS) / 1000.0,
            "int4 best of all paths ms/token": per_token(("int4-gemv", "int4-old")),
            "int4-old ms/token": per_token(("int4-old",)),
        }
        for k, v in summary.items():
            print(f"{k:<36} {v:8.3f}")
    for name, m, family in sorted(best):
        if family in ("fp8-gemv", "int4-gemv"):
            top = min((r for r in rows if r["linear"] == name and r["m"] == m
                       and r["path"].split("/")[0] == family), key=lambda r: r["us"])
            print(f"best {family:<9} {name:<8} M={m:<3} {top['path']:<40} {top['us']:8.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, summary=summary, device=device_name,
                           scaled_mm_mode=mode), f, indent=1)


if __name__ == "__main__":
    main()
