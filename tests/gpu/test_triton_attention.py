"""TRITON_ATTN kernels against an explicit torch reference (paged gather + causal softmax).

Runs on a CUDA device. ``python tests/gpu/test_triton_attention.py`` with
``TRITON_INTERPRET=1`` runs a few tiny cases on the CPU under the Triton interpreter
(see tests/test_triton_interpreter.py).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = 1e-2


# ----------------------------------------------------------------------------- helpers


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or bad rows)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _make_cache(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random paged KV cache and a block table over a random permutation of blocks.

    Unused block-table entries hold a huge block id: reading them faults / errors.
    """
    need = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    max_blocks = max(max(need), 1) + 1
    kv_cache = torch.randn(
        (2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen, dtype=torch.float32
    ).to(device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.full((len(seq_lens), max_blocks), 1 << 30, dtype=torch.int32)
    pos = 0
    for i, n in enumerate(need):
        block_table[i, :n] = perm[pos : pos + n].to(torch.int32)
        pos += n
    return kv_cache, block_table.to(device)


def _reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: list[int],
    query_lens: list[int],
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Per request: gather K/V via the block table, explicit causal (windowed) softmax."""
    ref_dtype = torch.float64 if query.device.type == "cpu" else torch.float32
    num_heads = query.shape[1]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(query.shape, dtype=ref_dtype, device=query.device)
    start = 0
    for i, (s, ql) in enumerate(zip(seq_lens, query_lens, strict=True)):
        if ql == 0 or s == 0:  # seq_len 0: a padded decode row, output zeros
            start += ql
            continue
        pos = torch.arange(s, device=query.device)
        slots = block_table[i, pos // block_size].long() * block_size + pos % block_size
        k = kv_cache[0].reshape(-1, num_kv_heads, kv_cache.shape[-1])[slots].to(ref_dtype)
        v = kv_cache[1].reshape(-1, num_kv_heads, kv_cache.shape[-1])[slots].to(ref_dtype)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[start : start + ql].to(ref_dtype).transpose(0, 1)  # [Hq, ql, D]
        scores = (q @ k.transpose(1, 2)) * scale
        qpos = torch.arange(s - ql, s, device=query.device)[:, None]
        allowed = pos[None, :] <= qpos
        if window:
            allowed &= pos[None, :] > qpos - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start : start + ql] = (scores.softmax(-1) @ v).transpose(0, 1)
        start += ql
    return out


def _run_prefill_case(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    window: int | None,
    device: str,
    seed: int,
    pad_tokens: int = 0,
) -> float:
    from pagedllm.attention.ops.triton_prefill_attention import prefill_attention

    gen = torch.Generator().manual_seed(seed)
    kv_cache, block_table = _make_cache(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, gen
    )
    num_tokens = sum(query_lens)
    query = torch.randn(
        (num_tokens + pad_tokens, num_heads, head_dim), generator=gen, dtype=torch.float32
    ).to(device=device, dtype=dtype)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    prefill_attention(
        query,
        kv_cache,
        block_table,
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        qsl.to(device),
        num_reqs=len(seq_lens),
        num_tokens=num_tokens,
        scale=scale,
        sliding_window=window,
        out=out,
    )
    ref = _reference(query, kv_cache, block_table, seq_lens, query_lens, scale, window)
    if pad_tokens:
        assert torch.isnan(out[num_tokens:]).all(), "padding rows were written"
    return _rel_err(out[:num_tokens], ref[:num_tokens])


def _run_decode_case(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    window: int | None,
    num_splits: int | None,
    device: str,
    seed: int,
) -> float:
    from pagedllm.attention.ops.triton_decode_attention import decode_attention

    gen = torch.Generator().manual_seed(seed)
    kv_cache, block_table = _make_cache(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, gen
    )
    batch = len(seq_lens)
    query = torch.randn((batch, num_heads, head_dim), generator=gen, dtype=torch.float32).to(
        device=device, dtype=dtype
    )
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    decode_attention(
        query,
        kv_cache,
        block_table,
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale,
        sliding_window=window,
        out=out,
        num_splits=num_splits,
    )
    ref = _reference(query, kv_cache, block_table, seq_lens, [1] * batch, scale, window)
    for i, s in enumerate(seq_lens):
        if s == 0:
            assert (out[i] == 0).all(), "padded decode row (seq_len 0) must be zeros"
    return _rel_err(out, ref)


def _mixed_batch(max_ctx: int, seed: int) -> tuple[list[int], list[int]]:
    """Prefill chunks with cached prefix, fresh prefills and decodes, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    reqs = [
        (37, 37 + 100),  # chunk over a cached prefix
        (1, 1),  # decode of a 1-token context
        (64, 64),  # fresh prefill
        (1, max_ctx),  # long decode
        (129, min(max_ctx, 3000) + 129),  # chunk over a long prefix
        (1, 17),
        (5, 5),
        (200, 200 + max_ctx // 2),
    ]
    order = torch.randperm(len(reqs), generator=gen).tolist()
    return [reqs[i][0] for i in order], [reqs[i][1] for i in order]


# ----------------------------------------------------------------------------- tests


def test_reshape_and_cache() -> None:
    from pagedllm.attention.ops.triton_reshape_and_cache import reshape_and_cache

    for dtype, hkv, d, bs in [(torch.float16, 8, 128, 16), (torch.bfloat16, 2, 64, 32),
                              (torch.float32, 3, 80, 16)]:
        num_blocks, t = 40, 50
        key = torch.randn(t, hkv, d, device="cuda", dtype=dtype)
        value = torch.randn(t, hkv, d, device="cuda", dtype=dtype)
        cache = torch.randn(2, num_blocks, bs, hkv, d, device="cuda", dtype=dtype)
        before = cache.clone()
        slots = torch.randperm(num_blocks * bs, device="cuda")[: t - 7].clone()
        slots[::5] = -1
        reshape_and_cache(key, value, cache, slots)
        expect = before.clone()
        flat = expect.view(2, num_blocks * bs, hkv, d)
        real = slots >= 0
        flat[0, slots[real]] = key[: t - 7][real]
        flat[1, slots[real]] = value[: t - 7][real]
        assert torch.equal(cache, expect)


PREFILL_CASES = [
    # (Hq, Hkv, D, block_size, dtype, window)
    (8, 8, 64, 16, torch.float16, None),
    (16, 8, 128, 32, torch.bfloat16, None),
    (14, 2, 128, 16, torch.float16, None),
    (32, 4, 64, 32, torch.bfloat16, None),
    (32, 8, 128, 16, torch.bfloat16, None),
    (8, 1, 128, 16, torch.float32, None),
    (16, 2, 64, 16, torch.float16, 256),
    (28, 4, 128, 32, torch.bfloat16, 1000),
]


@pytest.mark.parametrize("hq,hkv,d,bs,dtype,window", PREFILL_CASES)
def test_prefill_mixed_batch(
    hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype, window: int | None
) -> None:
    query_lens, seq_lens = _mixed_batch(8192, seed=hq * 31 + d)
    err = _run_prefill_case(query_lens, seq_lens, hq, hkv, d, bs, dtype, window, "cuda",
                            seed=hq + hkv + d + bs, pad_tokens=5)
    assert err < TOL, err


def test_prefill_long_chunk_and_odd_head_dim() -> None:
    # one 1024-token chunk over a 7000-token prefix; head_dim 80 (not a power of two)
    err = _run_prefill_case([1024, 1], [8024, 3], 8, 2, 128, 16, torch.bfloat16, None, "cuda", 1)
    assert err < TOL, err
    err = _run_prefill_case([33, 1, 70], [100, 9, 70], 4, 2, 80, 16, torch.float16, None,
                            "cuda", 2)
    assert err < TOL, err


DECODE_CASES = [
    # (Hq, Hkv, D, block_size, dtype, window, num_splits)
    (8, 8, 64, 16, torch.float16, None, None),
    (16, 8, 128, 32, torch.bfloat16, None, 1),
    (14, 2, 128, 16, torch.float16, None, 3),
    (32, 4, 64, 32, torch.bfloat16, None, 16),
    (32, 8, 128, 16, torch.bfloat16, None, None),
    (8, 1, 128, 16, torch.float32, None, 4),
    (16, 2, 64, 16, torch.float16, 256, None),
    (28, 4, 128, 32, torch.bfloat16, 1000, 1),
]


@pytest.mark.parametrize("hq,hkv,d,bs,dtype,window,splits", DECODE_CASES)
def test_decode(
    hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype, window: int | None,
    splits: int | None,
) -> None:
    seq_lens = [1, 8192, 0, 17, 4096, 63, 64, 65, 1000, 0, 2049]
    err = _run_decode_case(seq_lens, hq, hkv, d, bs, dtype, window, splits, "cuda",
                           seed=hq * 7 + d)
    assert err < TOL, err


def test_decode_cuda_graph() -> None:
    """Capture once, change seq_lens / query / cache in place, replay: still correct."""
    from pagedllm.attention.ops.triton_decode_attention import decode_attention

    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 32, 8, 128, 16
    max_lens = [4096, 4096, 4096, 4096]
    kv_cache, block_table = _make_cache(max_lens, hkv, d, bs, torch.bfloat16, "cuda", gen)
    seq_lens = torch.tensor([5, 100, 0, 3000], dtype=torch.int32, device="cuda")
    query = torch.randn(4, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(query)
    scale = d**-0.5
    decode_attention(query, kv_cache, block_table, seq_lens, scale, out=out)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(query, kv_cache, block_table, seq_lens, scale, out=out)
    for lens in ([4096, 1, 77, 0], [0, 0, 0, 0], [2500, 4000, 16, 1]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        query.copy_(torch.randn(4, hq, d, device="cuda", dtype=torch.bfloat16))
        kv_cache.normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(query, kv_cache, block_table, lens, [1] * 4, scale, None)
        if any(lens):
            assert _rel_err(out, ref) < TOL
        for i, s in enumerate(lens):
            if s == 0:
                assert (out[i] == 0).all()


@pytest.mark.parametrize("decode_only", [False, True])
def test_backend_forward(decode_only: bool) -> None:
    """The backend writes the cache (padded slots skipped) and dispatches; padded tensors."""
    from pagedllm.attention.backends.abstract import AttentionMetadata
    from pagedllm.attention.backends.triton_attn import TritonAttentionBackend

    assert TritonAttentionBackend.is_available("cuda")
    assert not TritonAttentionBackend.is_available("cpu")
    assert TritonAttentionBackend.supports_cuda_graphs()
    assert TritonAttentionBackend.name == "TRITON_ATTN"
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    if decode_only:
        query_lens, seq_lens = [1, 1, 1], [300, 1, 4100]
    else:
        query_lens, seq_lens = [20, 1, 300, 1], [20, 57, 1300, 2]
    kv_cache, block_table = _make_cache(seq_lens, hkv, d, bs, dtype, "cuda", gen)
    n = sum(query_lens)
    pad = 4
    query = torch.randn(n + pad, hq, d, device="cuda", dtype=dtype)
    key = torch.randn(n + pad, hkv, d, device="cuda", dtype=dtype)
    value = torch.randn(n + pad, hkv, d, device="cuda", dtype=dtype)
    slots = []
    for i, (ql, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for p in range(s - ql, s):
            slots.append(int(block_table[i, p // bs]) * bs + p % bs)
    slot_mapping = torch.tensor(slots + [-1] * pad, dtype=torch.int64, device="cuda")
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    meta = AttentionMetadata(
        num_actual_tokens=n,
        num_reqs=len(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc=qsl.cuda(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_table=block_table,
        slot_mapping=slot_mapping,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
        is_decode_only=decode_only,
    )
    impl = TritonAttentionBackend.get_impl_cls()(hq, d, d**-0.5, hkv)
    before = kv_cache.clone()
    out = impl.forward(query, key, value, kv_cache, meta)
    assert out.shape == query.shape and out.dtype == dtype
    flat = before.view(2, -1, hkv, d)
    flat[0, slot_mapping[:n]] = key[:n]
    flat[1, slot_mapping[:n]] = value[:n]
    assert torch.equal(kv_cache, before), "cache not written exactly at the real slots"
    ref = _reference(query, kv_cache, block_table, seq_lens, query_lens, d**-0.5, None)
    assert _rel_err(out[:n], ref[:n]) < TOL


# ----------------------------------------------------------------------------- interpreter


def run_interpreter_smoke() -> None:
    """Tiny cases on the CPU; run under TRITON_INTERPRET=1 (set before triton is imported)."""
    from pagedllm.attention.ops.triton_reshape_and_cache import reshape_and_cache

    key = torch.randn(6, 2, 32)
    value = torch.randn(6, 2, 32)
    cache = torch.zeros(2, 4, 4, 2, 32)
    slots = torch.tensor([3, -1, 9, 15, 0], dtype=torch.int64)
    reshape_and_cache(key, value, cache, slots)
    flat = cache.view(2, 16, 2, 32)
    assert torch.equal(flat[0, 9], key[2]) and torch.equal(flat[1, 15], value[3])
    assert (flat[:, 1] == 0).all()

    for dtype in (torch.float32, torch.float16):
        err = _run_prefill_case([5, 1, 9], [12, 3, 9], 4, 2, 32, 4, dtype, None, "cpu", 0, 2)
        assert err < TOL, ("prefill", dtype, err)
    err = _run_prefill_case([7, 1], [40, 21], 6, 2, 32, 8, torch.float32, 6, "cpu", 1)
    assert err < TOL, ("prefill window", err)
    for splits in (1, 3):
        err = _run_decode_case([1, 0, 37, 100], 4, 1, 32, 4, torch.float32, None, splits,
                               "cpu", 2)
        assert err < TOL, ("decode", splits, err)
    err = _run_decode_case([50, 9], 8, 2, 32, 8, torch.float32, 10, 2, "cpu", 3)
    assert err < TOL, ("decode window", err)
    print("INTERPRETER_OK")


if __name__ == "__main__":
    sys.exit(run_interpreter_smoke())
