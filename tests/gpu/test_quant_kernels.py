"""Quantization kernels against torch references: FP8 GEMM (Fp8Weight through
torch._scaled_mm) against bf16, the FP8 weight-only skinny GEMM (fp8_gemv) and the W4A16
skinny GEMM (int4_gemv) against dequantize-then-matmul, the per-token FP8 quantization
kernel, the W4A16 Triton GEMM against dequantize-then-matmul, and the FP8 KV cache
(cache write, prefill and decode attention) against attention over the unquantized K/V.

Runs on a CUDA device with FP8 (compute capability >= 8.9). ``python
tests/gpu/test_quant_kernels.py`` with ``TRITON_INTERPRET=1`` runs tiny cases on the CPU
(tests/test_triton_interpreter.py); the interpreter's e4m3 rounding is wrong where a value
rounds up to the next power of two, so its FP8 cases use values e4m3 holds exactly.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from test_triton_attention import _make_cache, _reference, _rel_err  # noqa: E402

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: each operand is off by up to 2^-4 of its magnitude (about
# 2^-5.5 rms); a product of two such operands over random data measures ~3.8% relative
# (Frobenius) error. Bound:
FP8_GEMM_REL_ERROR = 0.05
# Fast accumulation (no periodic float32 promotion in the tensor cores) against the
# promoted product of the same codes: a quarter of e4m3's own error at most.
FAST_ACCUM_REL_ERROR = 0.01
# FP8 K/V under softmax attention over random data: ~2-3% measured; bound:
FP8_KV_REL_ERROR = 0.05


def _fp8_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


gpu_fp8 = pytest.mark.skipif(not _fp8_ok(), reason="needs a CUDA GPU with FP8 (sm >= 8.9)")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _exact_fp8(shape: tuple[int, ...], gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """float32 values that e4m3 holds exactly (times a power-of-two scale)."""
    return (torch.randn(shape, generator=gen) * 4).to(FP8).float() * scale


# ----------------------------------------------------------------------------- int4
def _int4_case(m: int, n: int, k: int, group: int, dtype: torch.dtype, device: str,
               seed: int) -> float:
    from pagedllm.quantization.int4 import Int4Weight, dequantize

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    w = dequantize(codes, zeros, scales)  # float32 [N, K]
    x = torch.randn(m, k, generator=gen)
    layer = Int4Weight(codes.to(device), zeros.to(device), scales.to(device), None, dtype)
    from pagedllm.quantization.int4_kernels import int4_matmul

    y = int4_matmul(x.to(device, dtype), layer.qweight, layer.scales, layer.zeros, group)
    ref = x.to(dtype).float() @ w.t()
    return _rel_err(y.float().cpu(), ref)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 200, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_matmul_matches_dequantize_then_matmul(m: int, dtype: torch.dtype) -> None:
    """Exact up to the accumulation: the products of integer-valued (q - z) are exact in
    bf16 / fp16 and the sums float32; only the output rounding (2^-8 for bf16) remains."""
    for n, k, group in ((4096, 4096, 128), (1024, 14336, 128), (384, 512, 64), (96, 256, 32)):
        err = _int4_case(m, n, k, group, dtype, "cuda", seed=m)
        assert err < 5e-3, (m, n, k, group, err)


def test_int4_act_order_layer_matches_dense() -> None:
    from pagedllm.quantization.int4 import Int4Weight, dequantize

    gen = torch.Generator().manual_seed(0)
    n, k, group = 256, 512, 128
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.randperm(k, generator=gen) // group
    layer = Int4Weight(codes, zeros, scales, g_idx, torch.bfloat16).cuda()
    x = torch.randn(5, k, generator=gen)
    ref = x.to(torch.bfloat16).float() @ dequantize(codes, zeros, scales, g_idx).t()
    assert _rel_err(layer(x.cuda().bfloat16()).float().cpu(), ref) < 5e-3


def _gated_reference(y: torch.Tensor) -> torch.Tensor:
    """silu of the first half of the outputs times the second (float32)."""
    d = y.shape[-1] // 2
    return torch.nn.functional.silu(y[..., :d]) * y[..., d:]


def _int4_gemv_case(m: int, n: int, k: int, group: int, dtype: torch.dtype, device: str,
                    seed: int, gated: bool = False, reps: int = 1, **config: int) -> float:
    """int4_gemv (the shapes' own configuration, `config` overriding it; gated: silu(gate)
    * up of the two halves) against dequantize-then-matmul, `reps` launches on one split
    scratch (its counters must come back to zero)."""
    from pagedllm.quantization.gemv_split import GemvScratch
    from pagedllm.quantization.int4 import Int4Weight, dequantize
    from pagedllm.quantization.int4_gemv import int4_gemv, int4_gemv_config

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    layer = Int4Weight(codes.to(device), zeros.to(device), scales.to(device), None, dtype)
    ref = x_ref = None
    scratch = GemvScratch(64, n, 1024, torch.device(device))
    for rep in range(reps):
        x = torch.randn(m, k, generator=gen)
        cfg = {**int4_gemv_config(m, n, k, group, 132, gated), **config}
        y = int4_gemv(x.to(device, dtype), layer.qweight, layer.scales, layer.zeros, group,
                      cfg, gated=gated, scratch=scratch)
        assert y.dtype == dtype and y.shape == (m, n // 2 if gated else n)
        x_ref = x.to(dtype).float() @ dequantize(codes, zeros, scales).t()
        ref = _gated_reference(x_ref) if gated else x_ref
        err = _rel_err(y.float().cpu(), ref)
        if rep < reps - 1:
            assert err < 5e-3, (rep, err)
    assert int(scratch.counts.abs().sum()) == 0  # every tile's counter reset
    return err


@pytest.mark.parametrize("m", [1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_gemv_matches_dequantize_then_matmul(m: int, dtype: torch.dtype) -> None:
    """The skinny GEMM's bit-trick dequantization (16 + q, zero point outside the loop) is
    exact in bf16 / fp16: only float32 summation order and the output rounding remain."""
    for n, k, group in ((6144, 4096, 128), (4096, 14336, 128), (384, 512, 64), (96, 256, 32),
                        (4096, 4096, 128)):
        err = _int4_gemv_case(m, n, k, group, dtype, "cuda", seed=m)
        assert err < 5e-3, (m, n, k, group, err)
    for config in (dict(split=1), dict(split=7), dict(BLOCK_N=128, BLOCK_K=32),
                   dict(BLOCK_N=16, BLOCK_K=1024, split=2)):
        err = _int4_gemv_case(m, 1024, 2048, 128, dtype, "cuda", m, **config)
        assert err < 5e-3, (m, config, err)
    for n, k, config in ((28672, 4096, {}), (1024, 2048, dict(split=5)), (200, 384, {})):
        err = _int4_gemv_case(m, n, k, 128 if k % 128 == 0 else 64, dtype, "cuda", m,
                              gated=True, reps=3, **config)
        assert err < 5e-3, ("gated", n, k, config, err)


def test_int4_layer_dispatch_by_rows() -> None:
    """Int4Weight takes the GEMV up to GEMV_MAX_M rows and the GEMM above; both
    agree with the dense weight."""
    from pagedllm.quantization.int4 import GEMV_MAX_M, Int4Weight, dequantize

    gen = torch.Generator().manual_seed(3)
    n, k, group = 768, 1024, 128
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    layer = Int4Weight(codes, zeros, scales, None, torch.bfloat16).cuda()
    w = dequantize(codes, zeros, scales)
    for m, path in ((1, "gemv"), (GEMV_MAX_M, "gemv"), (GEMV_MAX_M + 1, "gemm")):
        assert layer.path(m, True) == path
        x = torch.randn(m, k, generator=gen).bfloat16()
        assert _rel_err(layer(x.cuda()).float().cpu(), x.float() @ w.t()) < 5e-3, m


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_gated_layer_fuses_silu_at_one_row(kind: str) -> None:
    """A gate / up MergedColumnParallelLinear with a quantized weight: at one row
    forward_gated runs the gated GEMV (silu(gate) * up in one kernel), at more rows the
    projection and SiluAndMul; both agree with the unfused product."""
    from pagedllm.models.layers.activation import SiluAndMul
    from pagedllm.models.layers.linear import MergedColumnParallelLinear
    from pagedllm.models.layers.quantized import attach_packed
    from pagedllm.quantization.fp8 import Fp8Weight, quantize_rows, scaled_mm_mode
    from pagedllm.quantization.int4 import Int4Weight

    if kind == "fp8" and not _fp8_ok():
        pytest.skip("needs FP8")
    gen = torch.Generator().manual_seed(7)
    hidden, inter = 1024, 1536
    linear = MergedColumnParallelLinear(hidden, [inter, inter])
    if kind == "int4":
        codes = torch.randint(0, 16, (2 * inter, hidden), generator=gen, dtype=torch.uint8)
        zeros = torch.randint(0, 16, (2 * inter, hidden // 128), generator=gen,
                              dtype=torch.uint8)
        scales = (torch.rand(2 * inter, hidden // 128, generator=gen) * 0.02 + 0.001).half()
        weight = Int4Weight(codes.cuda(), zeros.cuda(), scales.cuda(), None, torch.bfloat16)
    else:
        codes, scale = quantize_rows(torch.randn(2 * inter, hidden, generator=gen) * 0.05)
        mode = scaled_mm_mode(torch.device("cuda"), torch.bfloat16)
        weight = Fp8Weight(codes.cuda(), scale.cuda(), torch.bfloat16, mode)
    attach_packed(linear, weight)
    act = SiluAndMul()
    for m in (1, 1, 3):
        x = torch.randn(m, hidden, generator=gen).bfloat16().cuda()
        fused = weight.gated(x, "silu")
        assert (fused is not None) == (m == 1), m
        got = linear.forward_gated(x, act)
        ref = _gated_reference(x.float() @ weight.dequantized().t())
        assert got.shape == (m, inter) and got.dtype == torch.bfloat16
        # FP8 past one row quantizes the activations too (_scaled_mm): e4m3's bound
        bound = FP8_GEMM_REL_ERROR if kind == "fp8" and m > 1 else 2e-2
        assert _rel_err(got.float(), ref) < bound, (kind, m)


# ----------------------------------------------------------------------------- fp8 GEMM
def _fp8_gemv_case(m: int, n: int, k: int, dtype: torch.dtype, device: str, seed: int,
                   gated: bool = False, **config: int) -> float:
    """fp8_gemv (the shapes' own configuration, `config` overriding it; gated: silu(gate) *
    up) against dequantize-then-matmul: the same products in float32, so only summation
    order and the output rounding differ. Run twice on one split scratch."""
    from pagedllm.quantization.fp8 import quantize_rows
    from pagedllm.quantization.fp8_gemv import fp8_gemv, fp8_gemv_config
    from pagedllm.quantization.gemv_split import GemvScratch

    gen = torch.Generator().manual_seed(seed)
    codes, scale = quantize_rows(torch.randn(n, k, generator=gen))
    scratch = GemvScratch(64, n, 1024, torch.device(device))
    errors = []
    for _ in range(2):
        x = torch.randn(m, k, generator=gen)
        cfg = {**fp8_gemv_config(m, n, k, 132, gated), **config}
        y = fp8_gemv(x.to(device, dtype), codes.to(device), scale.reshape(1, -1).to(device),
                     dtype, cfg, gated=gated, scratch=scratch)
        assert y.dtype == dtype and y.shape == (m, n // 2 if gated else n)
        ref = x.to(dtype).float() @ (codes.float() * scale[:, None]).t()
        errors.append(_rel_err(y.float().cpu(), _gated_reference(ref) if gated else ref))
    assert int(scratch.counts.abs().sum()) == 0  # every tile's counter reset
    return max(errors)


@gpu_fp8
@pytest.mark.parametrize("m", [1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_gemv_matches_dequantize_then_matmul(m: int, dtype: torch.dtype) -> None:
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (200, 136)):
        err = _fp8_gemv_case(m, n, k, dtype, "cuda", m)
        assert err < 5e-3, (m, n, k, err)
    for config in (dict(split=1), dict(split=5), dict(BLOCK_N=32, BLOCK_K=64), dict(VEC=1),
                   dict(VEC=8, BLOCK_K=2048), dict(VEC=1, BLOCK_N=32, BLOCK_K=64)):
        err = _fp8_gemv_case(m, 512, 4096, dtype, "cuda", m, **config)
        assert err < 5e-3, (m, config, err)
    for n, k, config in ((28672, 4096, {}), (512, 4096, dict(split=5)), (200, 136, {}),
                         (28672, 4096, dict(VEC=1)), (200, 136, dict(VEC=1, split=3))):
        err = _fp8_gemv_case(m, n, k, dtype, "cuda", m, gated=True, **config)
        assert err < 5e-3, ("gated", n, k, config, err)


@gpu_fp8
def test_fp8_layer_dispatch_by_rows() -> None:
    """Fp8Weight: the weight-only GEMV up to GEMV_MAX_M rows, _scaled_mm above; both
    within the e4m3 bound of the bf16 product, and the skinny one within bf16 rounding of
    the dequantized weight (its activations are not quantized)."""
    from pagedllm.quantization.fp8 import GEMV_MAX_M, Fp8Weight, quantize_rows, scaled_mm_mode

    gen = torch.Generator(device="cuda").manual_seed(5)
    w = torch.randn(1024, 2048, device="cuda", generator=gen)
    codes, scale = quantize_rows(w)
    layer = Fp8Weight(codes, scale, torch.bfloat16,
                      scaled_mm_mode(torch.device("cuda"), torch.bfloat16))
    for m, path in ((1, "gemv"), (GEMV_MAX_M, "gemv"), (GEMV_MAX_M + 1, "scaled_mm")):
        assert layer.path(m, True) == path
        x = torch.randn(m, 2048, device="cuda", generator=gen).bfloat16()
        y = layer(x).float()
        assert _rel_err(y, x.float() @ w.t()) < FP8_GEMM_REL_ERROR, m
        if path == "gemv":
            assert _rel_err(y, x.float() @ layer.dequantized().t()) < 5e-3, m


@gpu_fp8
@gpu_fp8
@pytest.mark.parametrize("m", [1, 7, 256, 2048])
def test_fp8_gemm_against_bf16(m: int) -> None:
    from pagedllm.quantization.fp8 import Fp8Weight, quantize_rows, scaled_mm_mode

    gen = torch.Generator(device="cuda").manual_seed(m)
    mode = scaled_mm_mode(torch.device("cuda"), torch.bfloat16)
    for n, k in ((6144, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        codes, scale = quantize_rows(w)
        y = Fp8Weight(codes, scale, torch.bfloat16, mode)(x)
        ref = x.float() @ w.float().t()
        err = _rel_err(y.float(), ref)
        assert err < FP8_GEMM_REL_ERROR, (m, n, k, mode, err)
        # fast accumulation (the engine's default on CUDA): the same bound against bf16, and
        # within FAST_ACCUM_REL_ERROR of the float32-promoted product on the same codes
        fast = Fp8Weight(codes, scale, torch.bfloat16, mode, fast_accum=True)(x)
        assert _rel_err(fast.float(), ref) < FP8_GEMM_REL_ERROR, (m, n, k, mode, "fast")
        drift = _rel_err(fast.float(), y.float())
        assert drift < FAST_ACCUM_REL_ERROR, (m, n, k, mode, drift)


@gpu_fp8
def test_fp8_gemm_static_input_scale_and_fp16() -> None:
    from pagedllm.quantization.fp8 import Fp8Weight, quantize_rows, scaled_mm_mode

    gen = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(512, 1024, device="cuda", generator=gen)
    x = torch.randn(33, 1024, device="cuda", generator=gen)
    codes, scale = quantize_rows(w)
    for dtype in (torch.float16, torch.bfloat16):
        mode = scaled_mm_mode(torch.device("cuda"), dtype)
        static = (x.abs().max() / 448).reshape(1)
        for s in (None, static):
            y = Fp8Weight(codes, scale, dtype, mode, s)(x.to(dtype))
            assert y.dtype == dtype
            assert _rel_err(y.float(), x.to(dtype).float() @ w.t()) < FP8_GEMM_REL_ERROR


@gpu_fp8
def test_per_token_quant_kernel_matches_reference() -> None:
    from pagedllm.quantization.fp8 import quantize_tokens_reference
    from pagedllm.quantization.fp8_kernels import quantize_fp8

    gen = torch.Generator(device="cuda").manual_seed(0)
    for k in (64, 4096, 14336):
        x = (torch.randn(37, k, device="cuda", generator=gen)
             * torch.logspace(-3, 2, 37, device="cuda")[:, None]).bfloat16()
        x[5] = 0
        q, s = quantize_fp8(x)
        rq, rs = quantize_tokens_reference(x)
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
        diff = (q.float() - rq.float()).abs()
        assert (diff <= rq.float().abs() * 2**-3 + 1e-30).all()  # at most one e4m3 step
        assert (diff > 0).float().mean() < 1e-3


# ----------------------------------------------------------------------------- fp8 KV
def _fp8_kv_case(query_lens: list[int], seq_lens: list[int], decode: bool, dtype: torch.dtype,
                 device: str, exact: bool, seed: int, q_scale: float = 1.0,
                 **decode_options) -> float:
    """Attention over an FP8 cache (scales k 0.5, v 2) against attention over the K/V it
    stands for (exact: values e4m3 holds; else the unquantized values). q_scale: the
    queries' magnitude (past fp16's range for bf16 at 1e5)."""
    from pagedllm.attention.ops.triton_decode_attention import decode_attention
    from pagedllm.attention.ops.triton_prefill_attention import prefill_attention

    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, bs = 8, 2, 64, 16
    cache, table = _make_cache(seq_lens, hkv, d, bs, torch.float32, "cpu", gen)
    ks, vs = 0.5, 2.0
    if exact:
        cache[0] = _exact_fp8(cache[0].shape, gen, ks)
        cache[1] = _exact_fp8(cache[1].shape, gen, vs)
    else:
        cache[0] *= ks
        cache[1] *= vs
    fp8 = torch.stack([(cache[0] / ks).clamp(-448, 448), (cache[1] / vs).clamp(-448, 448)]
                      ).to(FP8).to(device)
    k_scale = torch.tensor([ks], device=device)
    v_scale = torch.tensor([vs], device=device)
    ref_cache = cache.to(dtype).to(device)  # what a dtype cache would hold
    table = table.to(device)
    n = sum(query_lens)
    q = (q_scale * torch.randn(n, hq, d, generator=gen)).to(device, dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = d**-0.5 / q_scale  # the same softmax whatever the queries' magnitude
    if decode:
        out = decode_attention(q, fp8, table, sl, scale, k_scale=k_scale, v_scale=v_scale,
                               **decode_options)
    else:
        qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(),
                           dtype=torch.int32, device=device)
        out = prefill_attention(q, fp8, table, sl, qsl, len(seq_lens), n, scale,
                                k_scale=k_scale, v_scale=v_scale)
    ref = _reference(q, ref_cache, table, seq_lens, query_lens, scale, None)
    return _rel_err(out.float().cpu(), ref.float().cpu())


@gpu_fp8
@pytest.mark.parametrize("decode", [False, True])
def test_fp8_kv_attention(decode: bool) -> None:
    if decode:
        seq_lens, query_lens = [1, 300, 77, 1000], [1, 1, 1, 1]
    else:
        seq_lens, query_lens = [40, 300, 17, 129], [40, 100, 1, 64]
    err = _fp8_kv_case(query_lens, seq_lens, decode, torch.bfloat16, "cuda", True, 0)
    assert err < 2e-2, err  # exact FP8 values: bf16 attention's own error
    err = _fp8_kv_case(query_lens, seq_lens, decode, torch.bfloat16, "cuda", False, 1)
    assert err < FP8_KV_REL_ERROR, err


@gpu_fp8
def test_fp8_reshape_and_cache() -> None:
    from pagedllm.attention.ops.triton_reshape_and_cache import reshape_and_cache

    gen = torch.Generator(device="cuda").manual_seed(0)
    key = torch.randn(20, 8, 128, device="cuda", generator=gen).bfloat16() * 30
    value = torch.randn(20, 8, 128, device="cuda", generator=gen).bfloat16()
    cache = torch.zeros(2, 8, 16, 8, 128, dtype=FP8, device="cuda")
    slots = torch.randperm(128, device="cuda")[:20]
    slots[3] = -1
    ks = torch.tensor([0.05], device="cuda")
    vs = torch.tensor([0.01], device="cuda")
    reshape_and_cache(key, value, cache, slots, ks, vs)
    flat = cache.view(2, 128, 8, 128).float()
    keep = slots >= 0
    want_k = (key.float() / ks).clamp(-448, 448).to(FP8).float()[keep]
    want_v = (value.float() / vs).clamp(-448, 448).to(FP8).float()[keep]
    got_k, got_v = flat[0, slots[keep]], flat[1, slots[keep]]
    assert ((got_k - want_k).abs() <= want_k.abs() * 2**-3).all()
    assert ((got_v - want_v).abs() <= want_v.abs() * 2**-3).all()
    assert float(want_k.abs().max()) == 448.0  # saturated, not NaN
    assert torch.isfinite(flat).all()


# ----------------------------------------------------------------------------- interpreter
@gpu_fp8
@pytest.mark.parametrize("dtype,q_scale", [(torch.bfloat16, 1.0), (torch.bfloat16, 1e5),
                                           (torch.float16, 1.0)])
@pytest.mark.parametrize("fp8_words", [True, False])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_kv_decode_forms(dtype: torch.dtype, q_scale: float, fp8_words: bool,
                             num_splits: int) -> None:
    """Both FP8-cache decode forms (V read as 16-bit words of two codes, or byte by byte),
    split or not, fp16 products for bf16 queries of any magnitude (1e5 is past fp16's
    range: the kernel divides q by its largest entry first)."""
    err = _fp8_kv_case([1] * 4, [1, 300, 77, 1000], True, dtype, "cuda", True, 3, q_scale,
                       fp8_words=fp8_words, num_splits=num_splits)
    assert err < 2e-2, err


def run_interpreter_smoke() -> None:
    """Tiny cases on the CPU; run under TRITON_INTERPRET=1 (set before triton is imported)."""
    from pagedllm.attention.ops.triton_reshape_and_cache import reshape_and_cache
    from pagedllm.quantization.fp8_kernels import quantize_fp8

    for m in (1, 20):
        err = _int4_case(m, 64, 256, 32, torch.float16, "cpu", m)
        assert err < 5e-3, ("int4", m, err)
    small = dict(BLOCK_N=32, num_stages=1)
    for n, k, group, dtype, gated, config in (
            (64, 256, 128, torch.float16, False, dict(split=1)),
            (96, 512, 128, torch.float32, False, dict(split=3, BLOCK_K=32)),
            (64, 256, 32, torch.float16, False, dict(split=2, BLOCK_K=16)),
            (40, 256, 64, torch.float16, False, dict(split=1, BLOCK_K=64)),
            (64, 512, 32, torch.float32, False, dict(split=1, BLOCK_K=256)),  # 8 groups a tile
            (64, 384, 64, torch.float32, False, dict(split=1, BLOCK_K=256)),  # K not a multiple
            (96, 768, 64, torch.float32, False, dict(split=2, BLOCK_K=256)),  # ... nor a split
            (128, 512, 128, torch.float32, True, dict(split=1, BLOCK_K=128)),
            (80, 1024, 64, torch.float16, True, dict(split=3, BLOCK_K=128))):
        err = _int4_gemv_case(1, n, k, group, dtype, "cpu", n, gated, reps=2, **small,
                              **config)
        # float32: the codes' float32 biases (up to 2048) leave ~2^-13 of the partial sums
        assert err < (1e-4 if dtype == torch.float32 else 5e-3), ("int4 gemv", n, k, err)
    for n, k, dtype, gated, config in (
            (40, 256, torch.float16, False, dict(split=1)),
            (48, 200, torch.float32, False, dict(split=1)),  # K not a multiple of BLOCK_K
            (32, 1024, torch.float16, False, dict(split=3)),
            (20, 96, torch.float16, False, dict(split=2)),
            (64, 256, torch.float32, True, dict(split=1)),
            (48, 200, torch.float32, True, dict(split=3)),
            (40, 256, torch.float16, False, dict(split=1, VEC=1)),  # one product per thread
            (48, 200, torch.float32, True, dict(split=3, VEC=1))):
        err = _fp8_gemv_case(1, n, k, dtype, "cpu", n, gated, BLOCK_K=64, num_stages=1,
                             **config)
        assert err < (1e-5 if dtype == torch.float32 else 1e-3), ("fp8 gemv", n, k, err)
    gen = torch.Generator().manual_seed(0)
    x = _exact_fp8((5, 48), gen)
    x[:, 0] = 448.0  # every row's scale is 1: the codes are x itself
    q, s = quantize_fp8(x)
    assert torch.equal(s, torch.ones(5, 1)) and torch.equal(q.float(), x)
    q, s = quantize_fp8(x, torch.tensor([2.0]))
    assert torch.equal(q.float(), x / 2) and torch.equal(s, torch.full((5, 1), 2.0))

    key = _exact_fp8((6, 2, 32), gen, 0.5)
    value = _exact_fp8((6, 2, 32), gen, 4.0)
    cache = torch.zeros(2, 4, 4, 2, 32, dtype=FP8)
    slots = torch.tensor([3, -1, 9, 15, 0], dtype=torch.int64)
    reshape_and_cache(key, value, cache, slots, torch.tensor([0.5]), torch.tensor([4.0]))
    flat = cache.view(2, 16, 2, 32).float()
    assert torch.equal(flat[0, 9], key[2] / 0.5) and torch.equal(flat[1, 15], value[3] / 4)
    for decode in (False, True):
        ql = [1, 1] if decode else [5, 9]
        err = _fp8_kv_case(ql, [12, 30], decode, torch.float32, "cpu", True, 2)
        assert err < 1e-4, ("fp8 kv", decode, err)
    for splits in (1, 2):  # fp16 products, V as 16-bit words (the interpreter's fallback)
        err = _fp8_kv_case([1, 1], [12, 70], True, torch.float16, "cpu", True, 4,
                           fp8_words=True, num_splits=splits, block_n=16)
        assert err < 2e-3, ("fp8 kv words", splits, err)
    print("QUANT_INTERPRETER_OK")


if __name__ == "__main__":
    sys.exit(run_interpreter_smoke())
