"""FLASH_ATTN against TRITON_ATTN, kernel against kernel, on Llama-3-8B attention shapes
(32 q heads, 8 kv heads, head_dim 128, bf16, blocks scattered randomly over the cache; each
backend at its engine block size: 16 for Triton, 256 or 16 for FlashAttention).

- decode: batch 64 at 4k context; bytes moved (K+V read, q read, out written) as GB/s and
  as a fraction of a measured device-to-device copy; plain launches and CUDA-graph replays
  (FLASH_ATTN's where its kernel is captured). A FLASH_ATTN kernel that gathers K/V from the
  blocks is timed with its per-layer gather (the slot list is made once per step).
- prefill: 8 x 2048 causal, fresh; FLOPs (4 * causal pairs * heads * head_dim) as TFLOP/s
  and as a fraction of a measured bf16 8192^3 matmul.

    python benchmarks/kernel_attention.py [--batch 64 --ctx 4096]
        [--prefill-reqs 8 --prefill-len 2048]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_decode import bench, copy_bandwidth, rel_err  # noqa: E402

from pagedllm.attention.backends.abstract import AttentionMetadata  # noqa: E402
from pagedllm.attention.backends.flash_attn import (  # noqa: E402
    FlashAttentionBackend,
    cu_seqlens,
    select_kernel,
)
from pagedllm.attention.ops.triton_decode_attention import decode_attention  # noqa: E402
from pagedllm.attention.ops.triton_prefill_attention import prefill_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
FLASH_BLOCK = FlashAttentionBackend.resolve_block_size(None)  # the engine's: 256 or 16


def matmul_rate(n: int = 8192) -> float:
    """TFLOP/s of a bf16 n x n x n torch matmul."""
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    ms = bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def paged(seq_lens: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache holding exactly these contexts and a block table over shuffled blocks."""
    need = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(need)
    kv_cache = torch.randn(2, total, block_size, HKV, D, device="cuda", dtype=DTYPE)
    perm = torch.randperm(total, device="cuda").to(torch.int32)
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[start:start + n]
        start += n
    return kv_cache, table


def flash_call(query: torch.Tensor, q_lens: list[int], seq_lens: list[int]
               ) -> tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor]:
    """One layer's FLASH_ATTN kernel call (as the backend makes it, after the step's shared
    values are made), and its cache and block table."""
    kernel = select_kernel(torch.cuda.current_device())
    kv_cache, table = paged(seq_lens, FLASH_BLOCK)
    qsl = cu_seqlens(torch.tensor(q_lens, dtype=torch.int32))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=sum(q_lens), num_reqs=len(q_lens), max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), query_start_loc=qsl.cuda(), seq_lens=lens.cuda(),
        block_table=table, slot_mapping=torch.empty(0, dtype=torch.long, device="cuda"),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens)

    def fn() -> torch.Tensor:
        return kernel.attend(query, kv_cache, md, D**-0.5, (-1, -1))
    return fn, kv_cache, table


def reference(query: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor,
              q_lens: list[int], seq_lens: list[int]) -> torch.Tensor:
    """SDPA (flash) on each request's gathered, contiguous K/V."""
    outs, start = [], 0
    for i, (ql, sl) in enumerate(zip(q_lens, seq_lens, strict=True)):
        blocks = table[i, :math.ceil(sl / kv_cache.shape[2])].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:sl].transpose(0, 1)[None]
        v = kv_cache[1, blocks].flatten(0, 1)[:sl].transpose(0, 1)[None]
        q = query[start:start + ql].transpose(0, 1)[None]
        mask = None if ql == sl else torch.ones(ql, sl, dtype=torch.bool, device="cuda")
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=ql == sl, scale=D**-0.5, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += ql
    return torch.cat(outs)


def run_decode(batch: int, ctx: int, copy_gbs: float) -> None:
    seq_lens = [ctx] * batch
    query = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    nbytes = 2 * batch * ctx * HKV * D * 2 + 2 * query.numel() * 2
    rows = []
    fa, fa_cache, fa_table = flash_call(query, [1] * batch, seq_lens)
    fa_err = rel_err(fa(), reference(query, fa_cache, fa_table, [1] * batch, seq_lens))
    tr_cache, tr_table = paged(seq_lens, 16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)

    def tri() -> torch.Tensor:
        return decode_attention(query, tr_cache, tr_table, lens, D**-0.5, out=out)
    tr_err = rel_err(tri(), reference(query, tr_cache, tr_table, [1] * batch, seq_lens))
    graphs = select_kernel(torch.cuda.current_device()).cuda_graphs
    for name, fn, err, graph_too in (
            ("TRITON_ATTN decode (bs 16)", tri, tr_err, True),
            (f"FLASH_ATTN decode (bs {FLASH_BLOCK})", fa, fa_err, graphs)):
        for graph in (False, True)[:1 + graph_too]:
            ms = bench(fn, graph=graph)
            rows.append((f"{name}{' graph' if graph else ''} (err {err:.1e})", ms,
                         nbytes / ms / 1e6))
    print(f"\ndecode: batch {batch}, ctx {ctx}, {HQ}q/{HKV}kv heads, d{D}, bf16; "
          f"{nbytes / 1e9:.3f} GB moved; copy bandwidth {copy_gbs:.0f} GB/s")
    print(f"{'kernel':52s} {'us':>8s} {'GB/s':>8s} {'of copy':>8s}")
    for label, ms, gbs in rows:
        print(f"{label:52s} {ms * 1e3:8.1f} {gbs:8.0f} {gbs / copy_gbs:8.1%}")


def run_prefill(num_reqs: int, seq: int, tflops: float) -> None:
    tokens = num_reqs * seq
    q_lens = seq_lens = [seq] * num_reqs
    query = torch.randn(tokens, HQ, D, device="cuda", dtype=DTYPE)
    flops = 4 * num_reqs * (seq * (seq + 1) / 2) * HQ * D
    fa, fa_cache, fa_table = flash_call(query, q_lens, seq_lens)
    fa_err = rel_err(fa(), reference(query, fa_cache, fa_table, q_lens, seq_lens))
    tr_cache, tr_table = paged(seq_lens, 16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    qsl = cu_seqlens(lens)
    out = torch.empty_like(query)

    def tri() -> torch.Tensor:
        return prefill_attention(query, tr_cache, tr_table, lens, qsl, num_reqs, tokens,
                                 D**-0.5, out=out)
    tr_err = rel_err(tri(), reference(query, tr_cache, tr_table, q_lens, seq_lens))
    k = tr_cache[0][tr_table.long()].reshape(num_reqs, seq, HKV, D).transpose(1, 2)
    v = tr_cache[1][tr_table.long()].reshape(num_reqs, seq, HKV, D).transpose(1, 2)
    q = query.view(num_reqs, seq, HQ, D).transpose(1, 2)
    rows = []
    for name, fn, err in (
            ("TRITON_ATTN prefill (bs 16)", tri, f"{tr_err:.1e}"),
            (f"FLASH_ATTN prefill (bs {FLASH_BLOCK})", fa, f"{fa_err:.1e}"),
            ("torch SDPA, contiguous K/V (not paged)", lambda: torch.nn.functional.
             scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5,
                                          enable_gqa=True), "ref")):
        ms = bench(fn)
        rows.append((f"{name} (err {err})", ms, flops / ms / 1e9))
    print(f"\nprefill: {num_reqs} x {seq} causal, {HQ}q/{HKV}kv heads, d{D}, bf16; "
          f"{flops / 1e12:.2f} TFLOP; bf16 matmul {tflops:.0f} TFLOP/s")
    print(f"{'kernel':52s} {'us':>8s} {'TFLOP/s':>8s} {'of mm':>8s}")
    for label, ms, rate in rows:
        print(f"{label:52s} {ms * 1e3:8.1f} {rate:8.1f} {rate / tflops:8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--prefill-reqs", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    kernel = select_kernel(torch.cuda.current_device())
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"FLASH_ATTN kernel: {kernel.label} (CUDA graphs: {kernel.cuda_graphs})")
    copy_gbs = copy_bandwidth()
    tflops = matmul_rate()
    with torch.inference_mode():
        run_decode(args.batch, args.ctx, copy_gbs)
        run_prefill(args.prefill_reqs, args.prefill_len, tflops)


if __name__ == "__main__":
    main()
