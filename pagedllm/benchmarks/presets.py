"""Real model shapes (config.json values) for random-weight benchmarks (load_format="dummy")."""

from __future__ import annotations

import json
import os
import tempfile

PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, vocab_size=151936, tie_word_embeddings=True,
        sliding_window=32768, use_sliding_window=False, max_window_layers=21),
    "qwen2.5-1.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536,
        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, vocab_size=151936, tie_word_embeddings=True,
        sliding_window=32768, use_sliding_window=False, max_window_layers=21),
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, vocab_size=128256, tie_word_embeddings=False),
    # Two tiny layers over SmolLM2's vocabulary: the engine core's step costs next to
    # nothing, so a served run of it measures the front-end (API server) alone.
    "frontend-probe": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True),
    # 30.5B parameters, 3.3B active per token: 128 experts, top-8, moe_intermediate 768.
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
        intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        vocab_size=151936, tie_word_embeddings=False),
}


# quantization_config of a 4-bit checkpoint, for dummy weights in that format
PRESET_QUANTIZATION: dict[str, dict] = {
    "awq": dict(quant_method="awq", bits=4, group_size=128, zero_point=True, version="gemm"),
    "gptq": dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True,
                 checkpoint_format="gptq"),
}


def preset_folder(name: str, dtype: str = "bfloat16", quantization: dict | None = None) -> str:
    """Write config.json of a preset (with a `quantization_config`, if given) into a
    temporary folder and return the folder."""
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    folder = tempfile.mkdtemp(prefix=f"pagedllm-{name}-")
    config = {**PRESETS[name], "torch_dtype": dtype}
    if quantization is not None:
        config["quantization_config"] = quantization
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return folder
