"""Quantized serving end to end on CUDA (FP8 needs compute capability >= 8.9): a tiny random
model quantized to FP8 at load against bf16, the FP8 KV cache (twice the blocks for the same
memory) against the bf16 cache, and FP8 / AWQ / GPTQ checkpoints (reference packings of
tests/quant_utils.py) against their dequantized weights run dense; each with and without
CUDA graphs. Next-token logprobs agree within quant_utils.FP8_LOGPROB_ERROR and greedy
choices differ only at near ties (quant_utils.compare_first_tokens)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).parent.parent))

# conftest's tiny shapes (hidden 64, init 0.1): its bf16 logits are calm enough that the
# FP8 error, not bf16 chaos, decides (a 0.3 init makes bf16 itself diverge).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)
fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs compute capability >= 8.9")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    from model_utils import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", **TINY)


def _prompts(folder: str) -> list[list[int]]:
    vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
    rng = random.Random(0)
    return [[rng.randrange(10, vocab) for _ in range(n)]
            for n in (3, 9, 17, 40, 77, 128, 200, 333, 5, 64, 150, 500)]


def _llm(folder: str, eager: bool, **kwargs):
    from pagedllm import LLM

    # A fixed KV size: two engines live at once here, and a share of the GPU's memory taken
    # by the first leaves the second none.
    kwargs.setdefault("kv_cache_memory_bytes", "64MiB")
    return LLM(folder, device="cuda", dtype="bfloat16", enforce_eager=eager,
               max_num_seqs=16, **kwargs)


@fp8_gpu
@pytest.mark.parametrize("eager", [True, False])
def test_fp8_at_load_against_bf16(folder, eager: bool) -> None:
    from quant_utils import compare_first_tokens

    dense = _llm(folder, eager)
    fp8 = _llm(folder, eager, quantization="fp8")
    compare_first_tokens(dense, fp8, _prompts(folder))
    # decode steps (CUDA graphs unless eager) stay close too: 16 tokens of the first prompts
    from pagedllm import SamplingParams

    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in _prompts(folder)]
    a = [o.outputs[0].token_ids for o in dense.generate(reqs, sp, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in fp8.generate(reqs, sp, use_tqdm=False)]
    assert sum(x[:2] == y[:2] for x, y in zip(a, b)) >= len(a) // 2


@fp8_gpu
def test_fp8_inputs_quantized_by_the_kernels_before(folder, monkeypatch) -> None:
    """RMSNorm and SiLU-and-mul handing the FP8 linears their rows quantized give the
    same tokens and log-probabilities (within 1e-3; a code may differ by one e4m3 step, see
    test_fused_ops) as each linear quantizing its own input."""
    from pagedllm import SamplingParams
    from pagedllm.quantization.loader import FUSED_INPUT_QUANT_ENV

    fused = _llm(folder, False, quantization="fp8")
    layer = fused.engine.executor.runner.model.layers[0]
    assert layer.input_layernorm.fp8_output_for is not None
    assert layer.mlp.act_fn.fp8_output_for is not None
    monkeypatch.setenv(FUSED_INPUT_QUANT_ENV, "0")
    plain = _llm(folder, False, quantization="fp8")
    assert plain.engine.executor.runner.model.layers[0].input_layernorm.fp8_output_for is None
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    reqs = [{"prompt_token_ids": p} for p in _prompts(folder)]
    a = fused.generate(reqs, sp, use_tqdm=False)
    b = plain.generate(reqs, sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = [d[t].logprob for d, t in zip(x.outputs[0].logprobs, x.outputs[0].token_ids)]
        ly = [d[t].logprob for d, t in zip(y.outputs[0].logprobs, y.outputs[0].token_ids)]
        assert max(abs(u - v) for u, v in zip(lx, ly)) <= 1e-3


@fp8_gpu
@pytest.mark.parametrize("eager", [True, False])
def test_fp8_kv_cache(folder, eager: bool) -> None:
    from quant_utils import compare_first_tokens

    dense = _llm(folder, eager, kv_cache_memory_bytes="32MiB")
    fp8 = _llm(folder, eager, kv_cache_memory_bytes="32MiB", kv_cache_dtype="fp8")
    assert fp8.engine.scheduler.kv.pool.num_blocks == 2 * dense.engine.scheduler.kv.pool.num_blocks
    compare_first_tokens(dense, fp8, _prompts(folder))


@pytest.mark.parametrize("name,eager", [("awq", False), ("awq", True), ("gptq-act-order", False),
                                        ("ct-tensor-static", False), ("fp8-dynamic", True)])
def test_checkpoints_against_their_dequantized_weights(folder, tmp_path, name: str,
                                                       eager: bool) -> None:
    from quant_utils import awq_checkpoint, compare_first_tokens, fp8_checkpoint, gptq_checkpoint

    if name.startswith(("ct", "fp8")) and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability >= 8.9")
    dst, ref = str(tmp_path / "q"), str(tmp_path / "ref")
    {"awq": lambda: awq_checkpoint(folder, dst, ref, group=32),
     "gptq-act-order": lambda: gptq_checkpoint(folder, dst, ref, group=32, desc_act=True),
     "ct-tensor-static": lambda: fp8_checkpoint(folder, dst, ref, "compressed-tensors",
                                                "tensor", "static"),
     "fp8-dynamic": lambda: fp8_checkpoint(folder, dst, ref, "fp8", "tensor", "dynamic"),
     }[name]()
    quantized = _llm(dst, eager)
    assert quantized.engine.model_config.quant is not None
    assert not quantized.engine.model_config.quant.dequantize
    compare_first_tokens(_llm(ref, eager), quantized, _prompts(folder))
