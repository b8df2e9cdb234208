"""GGUF metadata -> a transformers config (Llama, Qwen2/3, Qwen2/3-MoE, Gemma 2/3)."""

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
    """Build a transformers config from GGUF metadata (Qwen2Config, Qwen3Config, ...; Llama's
    as `llama_config`)."""
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
    ffn = get("feed_forward_length")
    if ffn is None and ckpt.architecture not in ("qwen2moe", "qwen3moe"):
        raise ValueError(f"GGUF file {str(ckpt.path)!r} lacks feed_forward_length metadata.")
    vocab_size = get("vocab_size")
    if vocab_size is None:
        tokens = ckpt.get("tokenizer.ggml.tokens")
        embd = ckpt.tensor_by_name.get("token_embd.weight")
        vocab_size = len(tokens) if tokens else (embd.shape[0] if embd else None)
    kwargs: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": None if ffn is None else int(ffn),
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

    config: Any
    arch = ckpt.architecture
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensor_by_name
        kwargs["mlp_bias"] = "blk.0.ffn_gate.bias" in ckpt.tensor_by_name
        config = llama_config(kwargs)
    elif arch == "qwen2":
        from transformers import Qwen2Config

        config = Qwen2Config(architectures=["Qwen2ForCausalLM"], **kwargs)
    elif arch == "qwen3":
        from transformers import Qwen3Config

        kwargs["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensor_by_name
        config = Qwen3Config(architectures=["Qwen3ForCausalLM"], **kwargs)
    elif arch in ("qwen2moe", "qwen3moe"):
        config = _moe_config(ckpt, kwargs)
    elif arch in ("gemma2", "gemma3"):
        config = _gemma_config(ckpt, kwargs, theta)
    elif arch == "phi3":
        config = _phi3_config(ckpt, kwargs)
    else:  # ARCHITECTURE_ALIASES and this function disagree
        raise ValueError(f"GGUF architecture {ckpt.raw_architecture!r} has no config mapping.")
    # Older code reads the flat attribute; transformers 5 reads rope_parameters.
    config.rope_theta = theta
    name = ckpt.get("general.name")
    if name:
        config._model_name_or_path = name
    return config


# LlamaConfig's defaults for the fields a GGUF file does not carry.
_LLAMA_DEFAULTS = {"hidden_act": "silu", "initializer_range": 0.02, "use_cache": True,
                   "pretraining_tp": 1, "attention_dropout": 0.0}


def llama_config(fields: dict[str, Any]) -> Any:
    """A Llama config (model_type "llama") as transformers' PretrainedConfig with LlamaConfig's
    defaults: every field LlamaConfig sets, without importing LlamaConfig, whose module chain
    (activations, kernels hub, torch.distributed.tensor) costs about 1.2 s of the default
    model's start-up on a 2-core CPU. tests/test_gguf_loader.py holds it to LlamaConfig."""
    from transformers import PretrainedConfig

    values = {**_LLAMA_DEFAULTS, **fields}
    config = PretrainedConfig(architectures=["LlamaForCausalLM"], **values)
    config.model_type = "llama"
    config.use_cache = values["use_cache"]  # PretrainedConfig keeps neither of these two
    config.pad_token_id = values.get("pad_token_id")
    return config


def _moe_config(ckpt: GGUFCheckpoint, kwargs: dict[str, Any]) -> Any:
    """Qwen2-MoE / Qwen3-MoE: expert counts and sizes; every layer sparse (llama.cpp has
    no dense layers in these families)."""
    get = ckpt.arch_get
    num_experts = get("expert_count")
    top_k = get("expert_used_count")
    if num_experts is None or top_k is None:
        raise ValueError(f"GGUF file {str(ckpt.path)!r} ({ckpt.raw_architecture}) lacks "
                         "expert_count / expert_used_count metadata.")
    moe_ffn = get("expert_feed_forward_length")
    if moe_ffn is None:  # older files: the per-expert size only shows in the tensor
        moe_ffn = ckpt.tensor_by_name["blk.0.ffn_gate_exps.weight"].shape[1]
    # llama.cpp renormalizes the top-k weights for qwen3moe and not for qwen2moe, unless
    # the file says otherwise.
    norm = get("expert_weights_norm")
    kwargs.update(num_experts=int(num_experts), num_experts_per_tok=int(top_k),
                  moe_intermediate_size=int(moe_ffn), decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=bool(norm) if norm is not None
                  else ckpt.architecture == "qwen3moe")
    if kwargs.get("intermediate_size") is None:
        kwargs["intermediate_size"] = int(moe_ffn)
    if ckpt.architecture == "qwen3moe":
        from transformers import Qwen3MoeConfig

        kwargs["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensor_by_name
        return Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], **kwargs)
    from transformers import Qwen2MoeConfig

    shared = get("expert_shared_feed_forward_length")
    shexp = ckpt.tensor_by_name.get("blk.0.ffn_gate_shexp.weight")
    if shared is None:
        shared = shexp.shape[0] if shexp is not None else 0
    kwargs["shared_expert_intermediate_size"] = int(shared)
    return Qwen2MoeConfig(architectures=["Qwen2MoeForCausalLM"], **kwargs)


def _gemma_layer_types(ckpt: GGUFCheckpoint, n_layers: int) -> list[str]:
    """Sliding / full attention per layer: the file's pattern (a period, or one flag per
    layer), else llama.cpp's defaults (Gemma 2: every 2nd layer full; Gemma 3: every 6th)."""
    pattern = ckpt.arch_get("attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):
        if len(pattern) < n_layers:
            raise ValueError(f"GGUF sliding_window_pattern has {len(pattern)} entries for "
                             f"{n_layers} layers.")
        flags = [bool(x) for x in pattern[:n_layers]]
    else:
        period = int(pattern) if pattern else (2 if ckpt.architecture == "gemma2" else 6)
        flags = [(i + 1) % period != 0 for i in range(n_layers)]
    return ["sliding_attention" if f else "full_attention" for f in flags]


def _gemma_config(ckpt: GGUFCheckpoint, kwargs: dict[str, Any], theta: float) -> Any:
    """Gemma 2 / Gemma 3 text: softcaps, sliding window, per-layer-type rope (Gemma 3)."""
    get = ckpt.arch_get
    n_layers = kwargs["num_hidden_layers"]
    window = get("attention.sliding_window")
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (by
    # 1/sqrt(hidden / heads)); the file has no key for it.
    big = n_layers == (46 if ckpt.architecture == "gemma2" else 62)
    scalar = kwargs["hidden_size"] // kwargs["num_attention_heads"] if big else kwargs["head_dim"]
    kwargs.update(layer_types=_gemma_layer_types(ckpt, n_layers), query_pre_attn_scalar=scalar,
                  hidden_activation="gelu_pytorch_tanh")
    if window is not None:
        kwargs["sliding_window"] = int(window)
    if ckpt.architecture == "gemma2":
        from transformers import Gemma2Config

        kwargs["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
        kwargs["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0))
        return Gemma2Config(architectures=["Gemma2ForCausalLM"], **kwargs)
    from transformers import Gemma3TextConfig

    local = float(get("rope.freq_base_swa", 10000.0))
    kwargs["rope_parameters"] = {
        "full_attention": kwargs["rope_parameters"],
        "sliding_attention": {"rope_type": "default", "rope_theta": local},
    }
    config = Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], **kwargs)
    config.rope_local_base_freq = local
    return config


def _phi3_config(ckpt: GGUFCheckpoint, kwargs: dict[str, Any]) -> Any:
    """Phi-3 / Phi-4-mini with plain rope (partial rotary dimensions, sliding window); the
    long-context models' longrope factors (``rope_factors_long`` tensors) are refused."""
    from transformers import Phi3Config

    if "rope_factors_long.weight" in ckpt.tensor_by_name:
        raise ValueError(f"GGUF file {str(ckpt.path)!r} (phi3) uses longrope scaling "
                         "(rope_factors_long / rope_factors_short), which the GGUF loader "
                         "does not map; load the HF checkpoint of this model instead.")
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if kwargs["head_dim"] != head_dim:
        raise ValueError(f"GGUF file {str(ckpt.path)!r} (phi3) has head_dim "
                         f"{kwargs['head_dim']} != hidden / heads ({head_dim}).")
    rotary = ckpt.arch_get("rope.dimension_count")
    kwargs["partial_rotary_factor"] = 1.0 if rotary is None else int(rotary) / head_dim
    window = ckpt.arch_get("attention.sliding_window")
    kwargs["sliding_window"] = int(window) if window else None
    return Phi3Config(architectures=["Phi3ForCausalLM"], **kwargs)
