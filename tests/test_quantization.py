"""Quantization on the CPU: option and checkpoint checks, FP8 / AWQ / GPTQ checkpoints
(made here from a tiny random model by the reference packers of quant_utils) loaded by
dequantizing at load and compared with HF transformers on the dequantized weights, the
packed layers' weights against the reference dequantization, and quantization='fp8'
through torch's CPU FP8 matmul."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch
from parity_utils import generate, hf_greedy, hf_model, make_prompts
from quant_utils import awq_checkpoint, fp8_checkpoint, gptq_checkpoint

from pagedllm import LLM
from pagedllm.config import EngineArgs
from pagedllm.quantization import spec as qspec
from pagedllm.quantization.fp8 import FP8_DTYPE, Fp8Weight, quantize_rows, scaled_mm_mode


def _with_config(folder: str, tmp_path, **changes) -> str:
    """A copy of `folder`'s config (weights linked) with `changes` in config.json."""
    dst = tmp_path / "changed"
    dst.mkdir()
    for f in os.listdir(folder):
        os.symlink(os.path.join(folder, f), dst / f) if f != "config.json" else None
    config = json.load(open(os.path.join(folder, "config.json")))
    config.update(changes)
    json.dump(config, open(dst / "config.json", "w"))
    return str(dst)


def _vocab(folder: str) -> int:
    return json.load(open(os.path.join(folder, "config.json")))["vocab_size"]


# ------------------------------------------------------------------ options
def test_unknown_quantization_names_the_options(tiny_llama) -> None:
    with pytest.raises(ValueError, match="supported: gguf, fp8, compressed-tensors, awq, gptq"):
        EngineArgs(model=tiny_llama, device="cpu", quantization="int3").create_engine_config()


def test_bad_kv_cache_dtype(tiny_llama) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype='int8'.*auto, fp8, fp8_e4m3"):
        EngineArgs(model=tiny_llama, device="cpu", kv_cache_dtype="int8").create_engine_config()


def test_fp8_kv_cache_refused_by_torch_sdpa(tiny_llama) -> None:
    with pytest.raises(ValueError, match="not supported by the TORCH_SDPA.*TRITON_ATTN"):
        EngineArgs(model=tiny_llama, device="cpu", kv_cache_dtype="fp8").create_engine_config()


def test_checkpoint_method_needs_its_checkpoint(tiny_llama) -> None:
    with pytest.raises(ValueError, match="needs a checkpoint quantized with awq"):
        EngineArgs(model=tiny_llama, device="cpu", quantization="awq").create_engine_config()
    with pytest.raises(ValueError, match="needs a .gguf model file"):
        EngineArgs(model=tiny_llama, device="cpu", quantization="gguf").create_engine_config()


def test_fp8_needs_compute_capability_8_9(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    cfg = type("Config", (), {})()
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*this one is 8.0"):
        qspec.resolve_quantization("fp8", cfg, "cuda", 1)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise FP8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}}},
     "format 'pack-quantized'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits=8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     "AWQ version 'gemv'"),
])
def test_unsupported_checkpoint_quantization_fails_naming_it(tiny_llama, tmp_path, qc,
                                                              match) -> None:
    folder = _with_config(tiny_llama, tmp_path, quantization_config=qc)
    with pytest.raises(ValueError, match=match):
        LLM(folder, device="cpu")


def test_quantization_must_match_the_checkpoint(tiny_llama, tmp_path) -> None:
    folder = _with_config(tiny_llama, tmp_path, quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"})
    with pytest.raises(ValueError, match="does not match the checkpoint.*'awq'"):
        EngineArgs(model=folder, device="cpu", quantization="gptq").create_engine_config()


# ------------------------------------------------------------------ checkpoints
CHECKPOINTS = {
    "ct-channel-dynamic": lambda s, d, r: fp8_checkpoint(s, d, r, "compressed-tensors",
                                                         "channel", "dynamic"),
    "ct-tensor-static": lambda s, d, r: fp8_checkpoint(s, d, r, "compressed-tensors",
                                                       "tensor", "static", kv_scales=0.5),
    "fp8-static": lambda s, d, r: fp8_checkpoint(s, d, r, "fp8", "tensor", "static"),
    "fp8-dynamic": lambda s, d, r: fp8_checkpoint(s, d, r, "fp8", "tensor", "dynamic"),
    "awq-g32": lambda s, d, r: awq_checkpoint(s, d, r, group=32),
    "gptq-g32": lambda s, d, r: gptq_checkpoint(s, d, r, group=32),
    "gptq-g16-act-order": lambda s, d, r: gptq_checkpoint(s, d, r, group=16, desc_act=True),
}
METHOD = {"ct": "compressed-tensors", "fp8": "fp8", "awq": "awq", "gptq": "gptq"}


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    """name -> (quantized folder, dequantized reference folder)."""
    made: dict[str, tuple[str, str]] = {}

    def get(name: str) -> tuple[str, str]:
        if name not in made:
            base = tmp_path_factory.mktemp(name)
            dst, ref = str(base / "quantized"), str(base / "reference")
            CHECKPOINTS[name](tiny_llama, dst, ref)
            made[name] = (dst, ref)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_dequantized_on_cpu_matches_hf(name, checkpoints, caplog) -> None:
    folder, ref = checkpoints(name)
    prompts = make_prompts(_vocab(folder), seed=3)[:5]
    expected = hf_greedy(hf_model(ref), prompts, 16)
    with caplog.at_level(logging.INFO, logger="pagedllm.quantization.loader"):
        llm = LLM(folder, device="cpu", dtype="float32")
    assert llm.engine.model_config.quantization == METHOD[name.split("-")[0]]
    assert "dequantized at load to float32" in caplog.text
    assert generate(llm, prompts, 16) == expected


def _model_config(folder: str, **kwargs):
    return EngineArgs(model=folder, device="cpu", **kwargs).create_engine_config().model


def _load(model_config):
    from pagedllm.attention.backends.torch_sdpa import TorchSDPABackend
    from pagedllm.models.loader.model_loader import load_model

    return load_model(model_config, TorchSDPABackend.get_impl_cls(), torch.device("cpu"))


def _reference_weights(ref: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(ref, "model.safetensors"))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_packed_layers_hold_the_reference_weights(name, checkpoints) -> None:
    """The kernel path's load (taken on the CPU here, where a run would dequantize): every
    layer's packed weight is the reference's dequantized weight, fused pieces in order."""
    folder, ref = checkpoints(name)
    mc = _model_config(folder, dtype="bfloat16")
    if mc.quant.weight == "fp8" and not qspec.cpu_scaled_mm_works():
        pytest.skip("this torch has no FP8 matmul on the CPU")
    mc = dataclasses.replace(mc, quant=dataclasses.replace(mc.quant, dequantize=False))
    model = _load(mc)
    weights = _reference_weights(ref)
    for i, layer in enumerate(model.layers):
        stem = f"model.layers.{i}."
        pieces = {
            layer.self_attn.qkv_proj: ["self_attn.q_proj", "self_attn.k_proj",
                                       "self_attn.v_proj"],
            layer.self_attn.o_proj: ["self_attn.o_proj"],
            layer.mlp.gate_up_proj: ["mlp.gate_proj", "mlp.up_proj"],
            layer.mlp.down_proj: ["mlp.down_proj"],
        }
        for module, names in pieces.items():
            assert module.weight is None and module.packed is not None
            expected = torch.cat([weights[stem + n + ".weight"] for n in names])
            torch.testing.assert_close(module.packed.dequantized(), expected, rtol=0, atol=0)
        if name == "ct-tensor-static":
            assert float(layer.self_attn.attn.k_scale) == 0.5
            assert float(layer.self_attn.attn.v_scale) == 1.0
            assert float(layer.self_attn.qkv_proj.packed.input_scale) == pytest.approx(0.02)
    assert model.lm_head.weight is not None  # the LM head and embeddings stay dense


def test_missing_quantized_tensor_is_named(checkpoints, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = checkpoints("awq-g32")
    dst = tmp_path / "incomplete"
    dst.mkdir()
    for f in os.listdir(folder):
        if f != "model.safetensors":
            os.symlink(os.path.join(folder, f), dst / f)
    state = load_file(os.path.join(folder, "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.scales"]
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensors of 1 quantized layers.*gate_up_proj.*"
                                         r"1\.scales"):
        LLM(str(dst), device="cpu")


# ------------------------------------------------------------------ fp8 at load
needs_cpu_fp8 = pytest.mark.skipif(not qspec.cpu_scaled_mm_works(),
                                   reason="this torch has no FP8 matmul on the CPU")


def test_quantize_rows_error_bound() -> None:
    """e4m3 keeps 3 mantissa bits: each weight within 2^-4 of its magnitude (normal range),
    or half a subnormal step (2^-10 of the row scale) near zero."""
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64)[:, None]
    codes, scale = quantize_rows(w)
    assert codes.dtype == FP8_DTYPE and scale.shape == (64,)
    err = (codes.float() * scale[:, None] - w).abs()
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10)
    assert (err <= bound * 1.0001).all()
    assert torch.allclose(codes.float().abs().amax(1), torch.full((64,), 448.0))


@needs_cpu_fp8
def test_fp8_weight_matmul_within_e4m3_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    x = torch.randn(20, 128)
    codes, scale = quantize_rows(w)
    layer = Fp8Weight(codes, scale, torch.float32, scaled_mm_mode(torch.device("cpu"),
                                                                  torch.float32))
    y = layer(x)
    ref = x @ w.t()
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 0.06, rel  # two e4m3 roundings (about 2^-5 relative each, random signs)


@needs_cpu_fp8
def test_fp8_at_load_tracks_the_dense_model(tiny_llama) -> None:
    """quantization='fp8' (torch's CPU FP8 matmul) against the bf16 model: next-token
    logprobs within FP8_LOGPROB_ERROR, and greedy choices equal except at near ties."""
    from quant_utils import compare_first_tokens

    llm = LLM(tiny_llama, device="cpu", dtype="bfloat16", quantization="fp8")
    dense = LLM(tiny_llama, device="cpu", dtype="bfloat16")
    compare_first_tokens(dense, llm, make_prompts(_vocab(tiny_llama), seed=5))


# ------------------------------------------------------------------ GPU dispatch (CPU)
def test_fp8_and_int4_paths_by_rows() -> None:
    """Which product a layer picks for M rows: the weight-only GEMVs at decode batch 1 on
    CUDA (measured faster there on an H200), the GEMMs above, torch ops off CUDA (no GPU
    needed to ask)."""
    from pagedllm.quantization.fp8 import GEMV_MAX_M as FP8_MAX
    from pagedllm.quantization.int4 import GEMV_MAX_M as INT4_MAX
    from pagedllm.quantization.int4 import Int4Weight

    fp8 = Fp8Weight(*quantize_rows(torch.randn(64, 32)), torch.bfloat16, "rowwise")
    codes = torch.randint(0, 16, (64, 256), dtype=torch.uint8)
    zeros = torch.full((64, 2), 8, dtype=torch.uint8)
    int4 = Int4Weight(codes, zeros, torch.ones(64, 2).half(), None, torch.bfloat16)
    assert FP8_MAX == INT4_MAX == 1
    assert fp8.path(1, True) == "gemv" and int4.path(1, True) == "gemv"
    for m in (0, 2, 8, 64, 4096):
        assert fp8.path(m, True) == "scaled_mm" and int4.path(m, True) == "gemm"
    assert fp8.path(1, False) == "scaled_mm" and int4.path(1, False) == "torch"


def test_fast_accumulation_on_cuda_only_and_switched_off_by_env(monkeypatch) -> None:
    """The FP8 GEMMs' fast accumulation: on for CUDA weights unless
    PAGEDLLM_FP8_FAST_ACCUM=0, never on the CPU; a weight shows it in its repr."""
    from pagedllm.quantization.fp8 import FAST_ACCUM_ENV, fast_accum_default

    monkeypatch.delenv(FAST_ACCUM_ENV, raising=False)
    assert fast_accum_default(torch.device("cuda")) is True
    assert fast_accum_default(torch.device("cpu")) is False
    monkeypatch.setenv(FAST_ACCUM_ENV, "0")
    assert fast_accum_default(torch.device("cuda")) is False
    fp8 = Fp8Weight(*quantize_rows(torch.randn(64, 32)), torch.bfloat16, "rowwise",
                    fast_accum=True)
    assert fp8.fast_accum and "fast accumulation" in repr(fp8)
    assert "fast accumulation" not in repr(
        Fp8Weight(*quantize_rows(torch.randn(64, 32)), torch.bfloat16, "rowwise"))


def test_skinny_gemm_configs_fill_the_sms() -> None:
    """Configurations from shapes only: Llama-3-8B's FP8 linears need no K split (an N
    tile per SM at least); a narrow layer is split over K, never beyond its K
    blocks; more rows than the kernels serve is refused."""
    pytest.importorskip("triton")
    from pagedllm.quantization.fp8_gemv import fp8_gemv_config
    from pagedllm.quantization.int4_gemv import int4_gemv_config

    sms = 132
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        cfg = fp8_gemv_config(1, n, k, sms)
        assert cfg["split"] == 1 and n // cfg["BLOCK_N"] >= sms, (n, k, cfg)
        assert k % cfg["BLOCK_K"] == 0
    cfg = fp8_gemv_config(1, 128, 4096, sms)
    assert 1 < cfg["split"] <= 4096 // cfg["BLOCK_K"]
    k_blocks = 4096 // cfg["BLOCK_K"]
    assert (128 // cfg["BLOCK_N"]) * cfg["split"] >= sms or cfg["split"] == k_blocks
    assert fp8_gemv_config(1, 16, 64, sms)["split"] <= 1
    for n, k in ((28672, 4096), (14336, 4096), (4096, 14336), (4096, 4096), (256, 256)):
        for gated in (False, True):
            cfg = int4_gemv_config(1, n, k, 128, sms, gated)
            tiles = -(-(n // (2 if gated else 1)) // cfg["BLOCK_N"])
            block_k = cfg["BLOCK_K"]
            assert block_k >= 16 and block_k & (block_k - 1) == 0, cfg
            k_blocks = -(-k // block_k)
            assert 1 <= cfg["split"] <= k_blocks, (n, k, gated, cfg)
            assert cfg["split"] in (1, k_blocks) or tiles * cfg["split"] >= 3 * sms, cfg
            # ~8 KB of packed weight per program and iteration (two tiles when gated)
            tile_bytes = 4 * (block_k // 8) * cfg["BLOCK_N"] * (2 if gated else 1)
            assert tile_bytes == 8192 or block_k * (2 if gated else 1) >= k, cfg
    assert int4_gemv_config(1, 28672, 4096, 128, sms)["split"] == 1
    assert int4_gemv_config(1, 4096, 4096, 128, sms)["split"] > 1
    with pytest.raises(ValueError, match="at most 1 row"):
        fp8_gemv_config(2, 4096, 4096, sms)
    with pytest.raises(ValueError, match="divisible by 16"):
        int4_gemv_config(1, 256, 240, 24, sms)


def test_gated_form_dispatch(monkeypatch) -> None:
    """`gated` runs the weight's gated GEMV only on its one-row path and for SiLU, on the
    activations in the kernels' order (act-order: permuted), shaped [..., N / 2]; None
    elsewhere, so that the caller applies the activation itself."""
    from pagedllm.quantization.fp8 import Fp8Weight, quantize_rows
    from pagedllm.quantization.int4 import Int4Weight

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 256), generator=gen, dtype=torch.uint8)
    zeros = torch.full((64, 2), 8, dtype=torch.uint8)
    g_idx = torch.randperm(256, generator=gen) // 128
    int4 = Int4Weight(codes, zeros, torch.ones(64, 2).half(), g_idx, torch.bfloat16)
    fp8 = Fp8Weight(*quantize_rows(torch.randn(64, 256, generator=gen)), torch.bfloat16,
                    "rowwise")
    for weight in (int4, fp8):
        seen = []

        def fake_gemv(x2, gated, seen=seen):
            seen.append((x2, gated))
            return torch.zeros(x2.shape[0], 32 if gated else 64)

        monkeypatch.setattr(weight, "_gemv", fake_gemv)
        x = torch.randn(1, 1, 256, generator=gen)
        assert weight.gated(x, "silu") is None  # a CPU tensor: the torch path, no GEMV
        monkeypatch.setattr(weight, "path", lambda m, is_cuda: "gemv" if m == 1 else "gemm")
        assert weight.gated(x, "gelu") is None and weight.gated(x.expand(2, 1, 256),
                                                                "silu") is None
        out = weight.gated(x, "silu")
        assert out.shape == (1, 1, 32) and len(seen) == 1 and seen[0][1] is True
        want = x.reshape(1, 256) if weight is fp8 else x.reshape(1, 256)[:, int4.perm]
        assert torch.equal(seen[0][0], want)
