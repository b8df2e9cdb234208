"""GGUF metadata -> a transformers config (LlamaConfig / Qwen2Config / Qwen3Config)."""

from __future__ import annotations

import logging
import os
from typing import Any

from pagedllm.models.loader.gguf_reader import GGUFCheckpoint, open_checkpoint

logger = logging.getLogger(__name__)


def _rope_parameters(ckpt: GGUFCheckpoint, theta: float) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling_type = ckpt.arch_get("rope.scaling.type")
    factor = ckpt.arch_get("rope.scaling.factor")
    if scaling_type is None and ckpt.arch_get("rope.scale_linear") is not None:
        scaling_type, factor = "linear", ckpt.arch_get("rope.scale_linear")
    if scaling_type in (None, "none") or factor is None or float(factor) in (0.0, 1.0):
        return params
    if scaling_type == "linear":
        params.update(rope_type="linear", factor=float(factor))
    elif scaling_type == "yarn":
        params.update(rope_type="yarn", factor=float(factor))
        orig = ckpt.arch_get("rope.scaling.original_context_length")
        if orig is not None:
            params["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ("rope.scaling.attn_factor", "attention_factor"),
        ):
            value = ckpt.arch_get(gguf_key)
            if value is not None:
                params[hf_key] = float(value)
    else:
        logger.warning("Ignoring unsupported GGUF rope scaling type %r", scaling_type)
    return params


def gguf_to_hf_config(path: str | os.PathLike[str] | GGUFCheckpoint) -> Any:
    """Build a transformers config (LlamaConfig / Qwen2Config / Qwen3Config) from GGUF metadata."""
    ckpt = open_checkpoint(path)
    get = ckpt.arch_get
    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv")
    n_kv = n_heads if n_kv is None else int(n_kv)
    head_dim = get("attention.key_length")
    q_info = ckpt.tensor_by_name.get("blk.0.attn_q.weight")
    if head_dim is None and q_info is not None:
        head_dim = q_info.shape[0] // n_heads  # exact, even where head_dim != hidden / heads
    if head_dim is None:
        head_dim = get("rope.dimension_count") or hidden // n_heads
    theta = float(get("rope.freq_base", 10000.0))
    vocab_size = get("vocab_size")
    if vocab_size is None:
        tokens = ckpt.get("tokenizer.ggml.tokens")
        embd = ckpt.tensor_by_name.get("token_embd.weight")
        vocab_size = len(tokens) if tokens else (embd.shape[0] if embd else None)
    kwargs: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(head_dim),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_parameters": _rope_parameters(ckpt, theta),
        "tie_word_embeddings": not ckpt.has_output_weight,
        "dtype": "float32",
    }
    for key, hf_key in (
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ):
        if ckpt.get(key) is not None:
            kwargs[hf_key] = int(ckpt.get(key))

    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    config: Any
    if ckpt.architecture == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensor_by_name
        kwargs["mlp_bias"] = "blk.0.ffn_gate.bias" in ckpt.tensor_by_name
        config = LlamaConfig(architectures=["LlamaForCausalLM"], **kwargs)
    elif ckpt.architecture == "qwen2":
        config = Qwen2Config(architectures=["Qwen2ForCausalLM"], **kwargs)
    else:
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensor_by_name
        config = Qwen3Config(architectures=["Qwen3ForCausalLM"], **kwargs)
    # Older code reads the flat attribute; transformers 5 reads rope_parameters.
    config.rope_theta = theta
    name = ckpt.get("general.name")
    if name:
        config._model_name_or_path = name
    return config
