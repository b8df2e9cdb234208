"""Fused Triton layer kernels (residual add + RMSNorm, SiLU-and-mul, rotary, q / k head norm
+ rotary) against the torch reference in the layer modules.

Runs on a CUDA device. ``python tests/gpu/test_fused_ops.py`` with ``TRITON_INTERPRET=1``
runs small cases on the CPU under the Triton interpreter (tests/test_triton_interpreter.py).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.models.layers import fused_ops  # noqa: E402
from pagedllm.models.layers.activation import SiluAndMul  # noqa: E402
from pagedllm.models.layers.layernorm import RMSNorm  # noqa: E402
from pagedllm.models.layers.rotary import RotaryEmbedding  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                  exact_for: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    rel = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    if dtype in exact_for and out.is_cuda:
        # Same rounding order as the reference: all but a few elements agree to the last
        # bit (fp32 reductions and exp may differ in the last place and flip a rounding).
        # The interpreter truncates fp32 -> bf16 instead of rounding, so only on CUDA.
        exact = (out == ref).float().mean().item()
        assert exact > 0.98, exact


def check_rms_norm(device: str, dtype: torch.dtype, hidden: int, tokens: int) -> None:
    gen = torch.Generator().manual_seed(hidden + tokens)
    norm = RMSNorm(hidden, eps=1e-6).to(device=device, dtype=dtype)
    norm.weight.data = (torch.rand(hidden, generator=gen) + 0.5).to(device, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    _assert_close(fused_ops.rms_norm(x, norm.weight, norm.eps), norm.forward_native(x), dtype)
    out, res = fused_ops.rms_norm(x, norm.weight, norm.eps, residual)
    ref_out, ref_res = norm.forward_native(x, residual)
    _assert_close(res, ref_res, dtype)
    _assert_close(out, ref_out, dtype)
    # 3-D input of strided rows (q-norm over heads of a qkv slice).
    qkv = torch.randn(tokens, 3 * hidden, generator=gen).to(device, dtype)
    heads = qkv[:, :hidden].reshape(tokens, hidden // 16, 16)
    small = RMSNorm(16).to(device=device, dtype=dtype)
    _assert_close(fused_ops.rms_norm(heads, small.weight, small.eps),
                  small.forward_native(heads), dtype)


def check_silu_and_mul(device: str, dtype: torch.dtype, d: int, tokens: int) -> None:
    gen = torch.Generator().manual_seed(d + tokens)
    x = (3 * torch.randn(tokens, 2 * d, generator=gen)).to(device, dtype)
    _assert_close(fused_ops.silu_and_mul(x), SiluAndMul().forward_native(x), dtype)


def _assert_same_fp8(fused, ref_rows: torch.Tensor) -> None:
    """An `Fp8Activation` from a fused kernel against the separate quantization kernel of
    that kernel's model-dtype output: the same scales, bit for bit, and the same codes but
    for a rare one a single e4m3 step away (the quotient x / scale may differ in its last
    bit between two compiled kernels; an H200 showed such codes at 4096 x 256 in bf16)."""
    from pagedllm.quantization.fp8_kernels import quantize_fp8

    codes, scales = quantize_fp8(ref_rows.reshape(-1, ref_rows.shape[-1]))
    assert fused.codes.shape == ref_rows.shape and fused.scales.shape[-1] == 1
    assert torch.equal(fused.scales.reshape(-1, 1), scales)
    got = fused.codes.reshape(codes.shape).view(torch.uint8).int()
    want = codes.view(torch.uint8).int()
    differ = got != want
    assert differ.float().mean().item() <= 1e-3, differ.float().mean().item()
    same_sign = (got & 0x80) == (want & 0x80)
    assert (same_sign & ((got & 0x7F) - (want & 0x7F)).abs().le(1))[differ].all()


def check_fp8_outputs(device: str, dtype: torch.dtype, hidden: int, d: int,
                      tokens: int) -> None:
    """RMSNorm (with and without the residual) and SiLU-and-mul handing an FP8 linear its
    rows quantized: what quantizing their ordinary output gives, and the same residual."""
    gen = torch.Generator().manual_seed(hidden + d + tokens)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(device, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    x[0] = 0.0  # a row of zeros keeps a finite scale
    residual = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    residual[0] = 0.0
    _assert_same_fp8(fused_ops.rms_norm(x, weight, 1e-6, fp8_output=True),
                     fused_ops.rms_norm(x, weight, 1e-6))
    fused, fused_res = fused_ops.rms_norm(x, weight, 1e-6, residual, fp8_output=True)
    ref, ref_res = fused_ops.rms_norm(x, weight, 1e-6, residual)
    _assert_same_fp8(fused, ref)
    assert torch.equal(fused_res, ref_res)
    gate_up = (3 * torch.randn(tokens, 2 * d, generator=gen)).to(device, dtype)
    _assert_same_fp8(fused_ops.silu_and_mul(gate_up, fp8_output=True),
                     fused_ops.silu_and_mul(gate_up))


def check_rotary(device: str, dtype: torch.dtype, head_dim: int, num_heads: int,
                 num_kv_heads: int, tokens: int, partial: float = 1.0,
                 rope_scaling: dict | None = None) -> None:
    gen = torch.Generator().manual_seed(head_dim * num_heads + tokens)
    config = SimpleNamespace(rope_theta=10000.0, max_position_embeddings=4096,
                             rope_scaling=rope_scaling)
    rope = RotaryEmbedding(head_dim, 4096, config, rotary_dim=int(head_dim * partial))
    rope = rope.to(device)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(device, dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    q, k, _ = qkv.clone().split([q_size, kv_size, kv_size], dim=-1)
    ref_q, ref_k = rope.forward_native(positions, q, k)
    fused_ops.rotary_inplace(positions, q, k, rope.cos_cache, rope.sin_cache, head_dim,
                             rope.rotary_dim)
    # fp16 products may be contracted into FMAs (one rounding fewer): close, not bit-equal.
    _assert_close(q, ref_q, dtype, exact_for=(torch.bfloat16,))
    _assert_close(k, ref_k, dtype, exact_for=(torch.bfloat16,))


def check_qk_norm_rotary(device: str, dtype: torch.dtype, head_dim: int, num_heads: int,
                         num_kv_heads: int, tokens: int) -> None:
    """The one-launch q / k head norm + rotary against the norm modules then rotary."""
    gen = torch.Generator().manual_seed(head_dim * num_heads + tokens + 1)
    config = SimpleNamespace(rope_theta=1e6, max_position_embeddings=4096, rope_scaling=None)
    rope = RotaryEmbedding(head_dim, 4096, config).to(device)
    q_norm = RMSNorm(head_dim, eps=1e-6).to(device=device, dtype=dtype)
    k_norm = RMSNorm(head_dim, eps=1e-6).to(device=device, dtype=dtype)
    q_norm.weight.data = (torch.rand(head_dim, generator=gen) + 0.5).to(device, dtype)
    k_norm.weight.data = (torch.rand(head_dim, generator=gen) + 0.5).to(device, dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (3 * torch.randn(tokens, q_size + 2 * kv_size, generator=gen)).to(device, dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    nq = q_norm.forward_native(q.reshape(tokens, num_heads, head_dim)).reshape(tokens, q_size)
    nk = k_norm.forward_native(k.reshape(tokens, num_kv_heads, head_dim)).reshape(tokens,
                                                                                  kv_size)
    ref_q, ref_k = rope.forward_native(positions, nq, nk)
    v_before = v.clone()
    fused_ops.qk_norm_rotary_inplace(positions, q, k, q_norm.weight, k_norm.weight, 1e-6,
                                     rope.cos_cache, rope.sin_cache, head_dim)
    _assert_close(q, ref_q, dtype, exact_for=(torch.bfloat16,))
    _assert_close(k, ref_k, dtype, exact_for=(torch.bfloat16,))
    assert torch.equal(v, v_before)  # the value slice of the qkv row is untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,heads,kv_heads,tokens", [
    (128, 32, 4, 1), (128, 16, 8, 300), (64, 9, 3, 7)])
def test_qk_norm_rotary(dtype, head_dim, heads, kv_heads, tokens):
    check_qk_norm_rotary("cuda", dtype, head_dim, heads, kv_heads, tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,tokens", [(576, 1), (896, 256), (4096, 37), (5120, 3)])
def test_rms_norm(dtype, hidden, tokens):
    check_rms_norm("cuda", dtype, hidden, tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,tokens", [(1536, 1), (4864, 256), (14336, 19)])
def test_silu_and_mul(dtype, d, tokens):
    check_silu_and_mul("cuda", dtype, d, tokens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,d,tokens", [(4096, 14336, 256), (896, 4864, 3), (2048, 768, 37)])
def test_fp8_outputs_match_separate_quantization(dtype, hidden, d, tokens):
    check_fp8_outputs("cuda", dtype, hidden, d, tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,heads,kv_heads,partial", [
    (64, 14, 2, 1.0), (128, 32, 8, 1.0), (64, 9, 3, 1.0), (128, 28, 4, 0.5), (64, 4, 4, 1.0),
])
@pytest.mark.parametrize("tokens", [1, 300])
def test_rotary(dtype, head_dim, heads, kv_heads, partial, tokens):
    check_rotary("cuda", dtype, head_dim, heads, kv_heads, tokens, partial)


def test_rotary_llama3_scaling():
    check_rotary("cuda", torch.bfloat16, 128, 32, 8, 64, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})


def test_layers_dispatch_to_fused_kernels_on_cuda():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    norm = RMSNorm(64).to("cuda", torch.bfloat16)
    assert fused_ops.usable(x) and not fused_ops.usable(x.cpu())
    _assert_close(norm(x), norm.forward_native(x), torch.bfloat16)


def run_interpreter_smoke() -> int:
    """Small cases on the CPU (needs TRITON_INTERPRET=1 before triton is imported)."""
    for dtype in (torch.float32, torch.bfloat16):
        check_rms_norm("cpu", dtype, 96, 3)
        check_silu_and_mul("cpu", dtype, 80, 2)
        check_rotary("cpu", dtype, 32, 4, 2, 3)
        check_rotary("cpu", dtype, 32, 6, 3, 2, partial=0.5)
        check_qk_norm_rotary("cpu", dtype, 32, 6, 2, 3)
    check_fp8_outputs("cpu", torch.float16, 96, 80, 3)
    # fp16 only: the interpreter truncates fp32 -> bf16 stores instead of rounding them
    check_fp8_outputs("cpu", torch.float16, 64, 2100, 2)  # SiLU rows of two blocks
    print("FUSED_INTERPRETER_OK")
    return 0


if __name__ == "__main__":
    sys.exit(run_interpreter_smoke())
