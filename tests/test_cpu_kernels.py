"""The fused CPU kernels (pagedllm/cpu_kernels): bit for bit the torch ops they replace
(RMSNorm with residual, rotary, SiLU-and-mul), the decode attention against a float64
reference and the SDPA path, the layer modules' dispatch to them, and the build cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pagedllm.attention.backends.abstract import AttentionMetadata
from pagedllm.attention.backends.torch_sdpa import TorchSDPAImpl, write_kv_cache
from pagedllm.cpu_kernels import build
from pagedllm.cpu_kernels import ops as cpu_ops
from pagedllm.models.layers.activation import SiluAndMul
from pagedllm.models.layers.layernorm import RMSNorm
from pagedllm.models.layers.rotary import RotaryEmbedding

kernels = cpu_ops.get()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no C compiler for the kernels")
BF16 = torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("hidden", [17, 576, 960, 2048, 4096, 16384])
@pytest.mark.parametrize("rows", [1, 3])
def test_add_rms_norm_is_torch_bit_for_bit(hidden: int, rows: int) -> None:
    assert kernels.norm_exact(hidden)
    gen = torch.Generator().manual_seed(hidden + rows)
    for scale in (0.1, 1.0, 30.0):
        wide = (torch.randn(rows, hidden + 8, generator=gen) * scale).to(BF16)
        x = wide[:, 4:4 + hidden]  # a strided row layout, as a view of a wider output
        residual = torch.randn(rows, hidden, generator=gen).to(BF16)
        weight = (torch.rand(hidden, generator=gen) + 0.5).to(BF16)
        summed = x + residual
        out, new_residual = kernels.add_rms_norm(x, weight, 1e-5, residual)
        assert torch.equal(new_residual, summed)
        assert torch.equal(out, F.rms_norm(summed, weight.shape, weight, 1e-5))
        alone = kernels.add_rms_norm(x, weight, 1e-6)
        assert torch.equal(alone, F.rms_norm(x, weight.shape, weight, 1e-6))


@needs_kernels
def test_sum_order_calibration_found_a_width() -> None:
    assert kernels.sum_lanes in (4, 8, 16)
    assert not kernels.norm_exact(cpu_ops.MAX_NORM_WIDTH + 1)


class _RopeConfig:
    max_position_embeddings = 4096
    rope_theta = 100000.0


@needs_kernels
def test_rope_inplace_is_torch_bit_for_bit() -> None:
    rot = RotaryEmbedding(64, 4096, _RopeConfig())
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, (9 + 3 + 3) * 64, generator=gen).to(BF16)
    positions = torch.tensor([0, 1, 77, 1000, 4095])
    q, k, v = qkv.split([576, 192, 192], dim=-1)
    ref_q, ref_k = rot.forward_native(positions, q, k)
    v_before = v.clone()
    out_q, out_k = rot(positions, q, k)  # the module's CPU bf16 path: in place
    assert out_q.data_ptr() == q.data_ptr()
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert torch.equal(v, v_before)


@needs_kernels
def test_silu_and_mul_is_torch_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 2 * 1536, generator=gen) * 4).to(BF16)
    ref = SiluAndMul().forward_native(x)
    assert torch.equal(kernels.silu_and_mul(x), ref)
    assert torch.equal(SiluAndMul()(x), ref)


@needs_kernels
def test_silu_and_mul_every_bf16_gate() -> None:
    """Every finite bf16 gate value (the kernel's own exp against torch's, up to where it
    overflows), and infinities and NaN, times a few up values."""
    bits = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(BF16)
    gates = torch.cat([bits[torch.isfinite(bits.float())],
                       torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=BF16)])
    for up in (1.0, 0.37, -3.1, 1000.0):
        x = torch.cat([gates, torch.full_like(gates, up)]).view(1, -1)
        out, ref = kernels.silu_and_mul(x), SiluAndMul().forward_native(x)
        same = (out == ref) | (torch.isnan(out.float()) & torch.isnan(ref.float()))
        assert bool(same.all()), gates[~same[0]][:5]


@needs_kernels
def test_rms_norm_module_takes_the_kernel_and_matches() -> None:
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = (torch.rand(576) + 0.5).to(BF16)
    x, r = torch.randn(2, 576).to(BF16), torch.randn(2, 576).to(BF16)
    out, res = norm(x, r)
    x2 = x + r
    assert torch.equal(res, x2)
    assert torch.equal(out, F.rms_norm(x2, (576,), norm.weight, 1e-5))


def _decode_case(lens: list[int], hq: int, hkv: int, window: int | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d, block_size, num_blocks = 64, 16, 160
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen).to(BF16)
    perm = torch.randperm(num_blocks, generator=gen)
    per_row = num_blocks // len(lens)
    table = torch.stack([perm[i * per_row:(i + 1) * per_row] for i in range(len(lens))]).int()
    slots = torch.tensor([int(table[i, (n - 1) // block_size]) * block_size
                          + (n - 1) % block_size for i, n in enumerate(lens)])
    rows = len(lens)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=gen).to(BF16)
    q = qkv[:, :hq * d].view(rows, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(rows, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(rows, hkv, d)
    seq = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(rows + 1, dtype=torch.int32)
    md = AttentionMetadata(rows, rows, 1, max(lens), qsl, seq, table, slots, qsl, seq, True)
    return cache, q, k, v, md


def _reference(cache: torch.Tensor, q: torch.Tensor, md: AttentionMetadata,
               window: int | None) -> torch.Tensor:
    """float64 attention of each row over its written context."""
    block_size, hkv = cache.shape[2], cache.shape[3]
    rows, hq, d = q.shape
    out = torch.empty(rows, hq, d, dtype=torch.float64)
    for r in range(rows):
        n = int(md.seq_lens[r])
        blocks = md.block_table[r, :math.ceil(n / block_size)].long()
        k = cache[0, blocks].flatten(0, 1)[:n].double()
        v = cache[1, blocks].flatten(0, 1)[:n].double()
        start = 0 if window is None else max(0, n - window)
        k, v = k[start:], v[start:]
        for h in range(hq):
            kh = h // (hq // hkv)
            p = torch.softmax(k[:, kh] @ q[r, h].double() / math.sqrt(d), dim=0)
            out[r, h] = p @ v[:, kh]
    return out


@needs_kernels
@pytest.mark.parametrize("lens,hq,hkv,window", [
    ([1], 9, 3, None), ([150], 9, 3, None), ([17, 230, 64, 99], 9, 3, None),
    ([700], 8, 8, None), ([150, 40], 4, 1, 32), ([33], 16, 1, 8)])
def test_paged_decode_writes_and_attends(lens, hq, hkv, window) -> None:
    cache, q, k, v, md = _decode_case(lens, hq, hkv, window, seed=len(lens) + hq)
    expected_cache = cache.clone()
    write_kv_cache(k, v, expected_cache, md.slot_mapping)
    step = cpu_ops.DecodeStep.of(md.block_table, md.seq_lens, md.slot_mapping, len(lens),
                                 cache.shape[1], cache.shape[2])
    out = kernels.paged_decode(q, k, v, cache, step, 64 ** -0.5, window)
    assert torch.equal(cache, expected_cache)
    ref = _reference(cache, q, md, window)
    # bf16 output of float32 arithmetic: within two bf16 ulps of the float64 result
    assert (out.double() - ref).abs().max() <= 2 * 2 ** -8 * max(1.0, ref.abs().max())
    # and within what SDPA's own rounding allows of the torch path
    impl = TorchSDPAImpl(hq, 64, 64 ** -0.5, hkv, window)
    sdpa_cache = cache.clone()
    sdpa_md = AttentionMetadata(md.num_actual_tokens, md.num_reqs, 1, md.max_seq_len,
                                md.query_start_loc, md.seq_lens, md.block_table,
                                md.slot_mapping, md.query_start_loc_cpu, md.seq_lens_cpu,
                                True)
    torch_out = _sdpa_only(impl, q, k, v, sdpa_cache, sdpa_md)
    assert (torch_out.double() - ref).abs().max() <= 4 * 2 ** -8 * max(1.0, ref.abs().max())
    assert (out.double() - ref).abs().max() <= (torch_out.double() - ref).abs().max() + 2 ** -9


def _sdpa_only(impl: TorchSDPAImpl, q, k, v, cache, md) -> torch.Tensor:
    """The backend's torch path, with the fused kernel switched off for this call."""
    impl._fused_decode = lambda *args: None  # type: ignore[method-assign]
    return impl.forward(q, k, v, cache, md)


@needs_kernels
def test_backend_takes_the_kernel_for_bf16_decodes() -> None:
    cache, q, k, v, md = _decode_case([40, 90], 9, 3, None, seed=5)
    impl = TorchSDPAImpl(9, 64, 64 ** -0.5, 3, None)
    out = impl.forward(q, k, v, cache, md)
    assert any(key[0] == "cpu_kernels_decode" for key in md.backend_cache
               if isinstance(key, tuple))
    step = md.backend_cache["cpu_kernels_decode", cache.shape[1], cache.shape[2]]
    assert isinstance(step, cpu_ops.DecodeStep) and step.rows == 2
    assert (out.double() - _reference(cache, q, md, None)).abs().max() < 0.02


@needs_kernels
def test_decode_step_refuses_out_of_range_inputs() -> None:
    cache, q, k, v, md = _decode_case([40], 9, 3, None, seed=6)
    bad_slots = torch.tensor([cache.shape[1] * cache.shape[2]])
    with pytest.raises(ValueError, match="outside"):
        cpu_ops.DecodeStep.of(md.block_table, md.seq_lens, bad_slots, 1, cache.shape[1],
                              cache.shape[2])
    with pytest.raises(ValueError, match="int32"):
        cpu_ops.DecodeStep.of(md.block_table.long(), md.seq_lens, md.slot_mapping, 1,
                              cache.shape[1], cache.shape[2])
    negative = md.block_table.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="outside"):
        cpu_ops.DecodeStep.of(negative, md.seq_lens, md.slot_mapping, 1, cache.shape[1],
                              cache.shape[2])
    step = cpu_ops.DecodeStep.of(md.block_table, md.seq_lens, md.slot_mapping, 1,
                                 cache.shape[1], cache.shape[2])
    with pytest.raises(ValueError, match="unexpected"):  # a smaller cache than checked
        kernels.paged_decode(q, k, v, cache[:, :10].contiguous(), step, 0.125, None)
    with pytest.raises(ValueError, match="width"):
        kernels.add_rms_norm(torch.zeros(1, 64, dtype=BF16), torch.ones(32, dtype=BF16), 1e-5)
    long_seq = torch.tensor([md.block_table.shape[1] * cache.shape[2] + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        cpu_ops.DecodeStep.of(md.block_table, long_seq, md.slot_mapping, 1, cache.shape[1],
                              cache.shape[2])


def test_switch_and_cache_key(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(build.SWITCH_ENV, "0")
    assert build.load_library() is None
    monkeypatch.setenv(build.SWITCH_ENV, "1")
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    path = build.library_path("cc")
    assert path.parent == tmp_path / "cpu-kernels"
    assert build.library_path("gcc-12") != path  # the compiler is part of the key


@needs_kernels
def test_build_into_a_fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    lib = build.load_library()
    assert lib is not None
    assert len(list((tmp_path / "cpu-kernels").glob("kernels-*.so"))) == 1
    assert not list((tmp_path / "cpu-kernels").glob("tmp*"))  # no half-written leftovers


def test_prune_keeps_the_newest_builds(tmp_path) -> None:
    import os

    for i in range(6):
        path = tmp_path / f"kernels-{i}.so"
        path.write_bytes(b"")
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "other.txt").write_text("kept")
    build.prune(tmp_path, keep=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kernels-2.so", "kernels-3.so", "kernels-4.so", "kernels-5.so", "other.txt"]


@needs_kernels
def test_build_falls_back_to_serial_without_openmp(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path) -> None:
    """A compiler that refuses -fopenmp still builds the kernels (their OpenMP loop runs
    serially)."""
    real = build.find_compiler()
    fake = tmp_path / "cc-no-openmp"
    fake.write_text(f"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && exit 1; done\n"
                    f"exec {real} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    lib = build.load_library()
    assert lib is not None
    serial = cpu_ops.CpuKernels(lib)
    cache, q, k, v, md = _decode_case([300, 200, 250, 90], 9, 3, None, seed=8)
    step = cpu_ops.DecodeStep.of(md.block_table, md.seq_lens, md.slot_mapping, 4,
                                 cache.shape[1], cache.shape[2])
    other = cache.clone()
    out = serial.paged_decode(q, k, v, cache, step, 0.125, None)
    assert torch.equal(out, kernels.paged_decode(q, k, v, other, step, 0.125, None))


# ------------------------------------------------------------------------- int4 tiles
needs_int4 = pytest.mark.skipif(kernels is None or not kernels.has_int4,
                                reason="the kernels' int4 matmul needs AVX-512")


def _int4_weight(n: int, k: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scale = rng.random((n, k // 32), dtype=np.float32) * 0.02 + 0.001
    zero = rng.standard_normal((n, k // 32)).astype(np.float32) * 0.05
    s, z = torch.from_numpy(scale).to(BF16).float(), torch.from_numpy(zero).to(BF16).float()
    dense = ((torch.from_numpy(codes).float() - 8) * s.repeat_interleave(32, 1)
             + z.repeat_interleave(32, 1))  # what torch's int4 kernel computes with
    return codes, scale, zero, dense


@needs_int4
@pytest.mark.parametrize("n,k", [(96, 64), (200, 576), (576, 1536)])
def test_int4_tiles_match_dequantize_then_matmul(n: int, k: int) -> None:
    """Every row block size (1..8 rows, then more blocks, read from a tile unpacked once)
    and a width that is not a multiple of 16: float32 accumulation, so only the bf16
    output rounding remains, as for torch's int4 kernel on the same weight."""
    from pagedllm.models.layers.quantized import PackedWeight

    codes, scale, zero, dense = _int4_weight(n, k, n + k)
    tiled = PackedWeight.int4(codes, scale, zero, BF16)
    assert tiled.kind == "int4t"
    gen = torch.Generator().manual_seed(n)
    for m in (*range(1, 10), 16, 17, 40):
        wide = torch.randn(m, k + 8, generator=gen).to(BF16)
        x = wide[:, 8:]  # rows with a stride
        want = x.float() @ dense.t()
        got = tiled(x)
        assert got.dtype == BF16 and got.shape == (m, n)
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < 3e-3, (m, rel)  # bf16 output rounding: ~1.6e-3
        elementwise = (got.float() - want).abs() <= want.abs() * 2**-7 + 1e-3
        assert bool(elementwise.all()), m
        if m > 8:  # past 8 rows the tile is unpacked once for all rows: the same bits
            assert torch.equal(got[:8], tiled(x[:8].contiguous())), m


@needs_int4
def test_int4_tiles_close_to_torchs_kernel_and_off_in_exact_mode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.models.layers.quantized import PackedWeight

    codes, scale, zero, _ = _int4_weight(64, 256, 3)
    monkeypatch.setenv(build.SWITCH_ENV, "exact")
    reference = PackedWeight.int4(codes, scale, zero, BF16)
    assert reference.kind == "int4"  # exact mode keeps torch's kernel
    monkeypatch.delenv(build.SWITCH_ENV)
    tiled = PackedWeight.int4(codes, scale, zero, BF16)
    assert PackedWeight.int4(codes, scale, zero, torch.float32).kind == "int4"
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).to(BF16)
    a, b = tiled(x).float(), reference(x).float()
    assert ((a - b).norm() / b.norm()).item() < 4e-3
    assert torch.allclose(tiled.dequantized().float(), reference.dequantized().float(),
                          rtol=2**-7, atol=1e-3)


@needs_int4
def test_int4_matmul_refuses_bad_inputs() -> None:
    import numpy as np

    from pagedllm.cpu_kernels.ops import int4_tiles

    with pytest.raises(ValueError, match="multiple of 32"):
        int4_tiles(np.zeros((16, 48), dtype=np.uint8), torch.ones(16, 1), torch.ones(16, 1), 8)
    codes, sc, zz = int4_tiles(np.zeros((16, 64), dtype=np.uint8), torch.ones(16, 2),
                               torch.zeros(16, 2), kernels.int4_zero_shift)
    with pytest.raises(ValueError, match="weight tensors"):
        kernels.int4_matmul(codes, sc.double(), zz)
    matmul = kernels.int4_matmul(codes, sc, zz)
    with pytest.raises(ValueError, match="rows of 64"):
        matmul(torch.zeros(2, 32, dtype=BF16))
    with pytest.raises(ValueError, match="bf16"):
        matmul(torch.zeros(2, 64))
    assert matmul(torch.zeros(0, 64, dtype=BF16)).shape == (0, 16)


needs_int8 = pytest.mark.skipif(kernels is None or not kernels.has_int8,
                                reason="the kernels' int8 matmul needs AVX512-BF16")


@needs_int8
@pytest.mark.parametrize("n,k", [(40, 64), (1000, 576)])
def test_int8_tiles_give_float32_products_of_the_int8_weight(n: int, k: int) -> None:
    """int8 codes and bf16 inputs multiply exactly in vdpbf16ps and sum in float32: the
    float32 product of the dequantized weight up to summation order (no bf16 output)."""
    gen = torch.Generator().manual_seed(n)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    matmul = kernels.int8_matmul(*cpu_ops.int8_tiles(codes, scale))
    w = codes.float() * scale[:, None]
    for m in (1, 2, 7, 8, 9, 33):
        x = torch.randn(m, k, generator=gen).to(BF16)
        got = matmul(x)[:, :n]
        assert got.dtype == torch.float32
        want = x.double() @ w.double().t()
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-6, m


@needs_int8
def test_lm_head_of_a_packed_int8_embedding_takes_the_kernel() -> None:
    import numpy as np

    from pagedllm.models.layers.quantized import PackedWeight
    from pagedllm.models.layers.vocab_embedding import ParallelLMHead

    gen = np.random.default_rng(0)
    codes = gen.integers(-127, 128, (100, 64), dtype=np.int8)
    scale = (gen.random(100, dtype=np.float32) * 0.01).astype(np.float32)
    head = ParallelLMHead(100, 64)
    packed = PackedWeight.int8(codes, scale, BF16)
    object.__setattr__(head, "packed", packed)
    x = torch.randn(3, 64).to(BF16)
    logits = head.compute_logits(x)
    assert logits.dtype == torch.float32 and logits.shape == (3, 100)
    w = packed.codes.float() * packed.scales.float()[:, None]  # its bf16 scales, exact
    want = x.float() @ w.t()
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="int8_tiles"):
        cpu_ops.int8_tiles(torch.zeros(16, 3, dtype=torch.int8), torch.ones(16))
