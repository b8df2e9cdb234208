"""CPU low-bit matmul kernels vs dense F.linear at the default model's shapes, M = 1 and 32,
fp32 and bf16 activations (microseconds per call; random codes: only the speed matters).

  python benchmarks/cpu_kernels.py [THREADS]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv, gate_up, down, LM head


def bench(f: Callable[[], object], n: int = 50) -> float:
    for _ in range(5):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e6


def row(n: int, k: int, m: int) -> dict[str, float]:
    res: dict[str, float] = {}
    w = torch.randn(n, k)
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).removeprefix("torch.")
        x = torch.randn(m, k, dtype=dt)
        wd = w.to(dt)
        res[f"dense_{name}"] = bench(lambda x=x, wd=wd: F.linear(x, wd))
        w8 = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        s8 = torch.rand(n, dtype=dt)
        res[f"int8_{name}"] = bench(lambda x=x, w8=w8, s8=s8: torch._weight_int8pack_mm(x, w8, s8))
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz = torch.rand(k // 32, n, 2, dtype=dt)
        res[f"int4_{name}"] = bench(
            lambda x=x, w4=w4, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 32, sz))
    x = torch.randn(m, k)
    packed = torch._dyn_quant_pack_4bit_weight(
        torch.randint(0, 16, (n, k // 2), dtype=torch.uint8),
        torch.rand(n, k // 32, dtype=torch.bfloat16), None, 32, k, n)
    res["dyn_quant_4bit_float32"] = bench(
        lambda: torch._dyn_quant_matmul_4bit(x, packed, 32, k, n))
    return res


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    for n, k in SHAPES:
        for m in (1, 32):
            res = row(n, k, m)
            print(n, k, m, {key: round(v, 1) for key, v in res.items()}, flush=True)


if __name__ == "__main__":
    main()
