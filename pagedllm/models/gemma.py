"""Gemma 2 and Gemma 3 (text): interleaved sliding-window and global layers, four
(1 + w)-RMSNorms per layer, GeGLU (tanh) MLP, embeddings scaled by sqrt(hidden), tied head,
`query_pre_attn_scalar`; Gemma 2 softcaps attention scores and final logits, Gemma 3
normalizes q/k per head and has its own rope base (and scaling) per layer type."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionMetadata
from pagedllm.models.layers.activation import GeluAndMul
from pagedllm.models.layers.layernorm import GemmaRMSNorm
from pagedllm.models.layers.rotary import rope_parameters
from pagedllm.models.llama import (
    AttentionSettings,
    DecoderBuild,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
)

_LAYER_TYPES = ("sliding_attention", "full_attention")
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


def _softcap(config: Any, name: str) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name}={value!r} in config.json is not supported: it must be a "
                         "positive number or null.")
    return float(value)


def _layer_type(config: Any, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if not layer_types or len(layer_types) < config.num_hidden_layers:
        raise ValueError("config.json of a Gemma 2/3 model needs layer_types (one of "
                         f"{', '.join(_LAYER_TYPES)} per layer).")
    layer_type = layer_types[layer_idx]
    if layer_type not in _LAYER_TYPES:
        raise ValueError(f"layer_types[{layer_idx}]={layer_type!r} is not supported; "
                         f"supported: {', '.join(_LAYER_TYPES)}.")
    return layer_type


def _layer_rope(config: Any, layer_type: str) -> dict[str, Any] | None:
    """Per-layer-type rope settings (Gemma 3: local base for sliding layers, the global base
    and scaling for full ones), or None for one setting shared by all layers (Gemma 2)."""
    nested = getattr(config, "rope_parameters", None)
    if isinstance(nested, dict) and layer_type in nested:
        return dict(nested[layer_type])
    if getattr(config, "model_type", "") != "gemma3_text":
        return None
    params = rope_parameters(config)  # older config.json: rope_theta + rope_local_base_freq
    if layer_type == "sliding_attention":
        return {"rope_type": "default",
                "rope_theta": getattr(config, "rope_local_base_freq", None) or 10000.0}
    return params


class GemmaAttention(LlamaAttention):
    """Gemma 2 attention (Gemma 3 adds q/k norms)."""

    @classmethod
    def settings(cls, build: DecoderBuild, layer_idx: int) -> AttentionSettings:
        config = build.config
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=true (an encoder variant of Gemma) is "
                             "not supported; pagedllm serves the causal models.")
        layer_type = _layer_type(config, layer_idx)
        window = config.sliding_window if layer_type == "sliding_attention" else None
        return AttentionSettings(
            sliding_window=window,
            scale=float(config.query_pre_attn_scalar) ** -0.5,
            logits_soft_cap=_softcap(config, "attn_logit_softcapping"),
            rope_parameters=_layer_rope(config, layer_type),
        )

    @staticmethod
    def make_norm(size: int, eps: float) -> nn.Module:
        return GemmaRMSNorm(size, eps)


class Gemma3Attention(GemmaAttention):
    qk_norm = True


class Gemma2DecoderLayer(LlamaDecoderLayer):
    attention_cls: type[LlamaAttention] = GemmaAttention

    def __init__(self, build: DecoderBuild, layer_idx: int) -> None:
        super().__init__(build, layer_idx)
        hidden, eps = build.config.hidden_size, build.config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def make_mlp(self, build: DecoderBuild, layer_idx: int) -> nn.Module:
        config = build.config
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation={act!r} is not supported for Gemma; "
                             f"supported: {', '.join(_ACTIVATIONS)}.")
        return LlamaMLP(config.hidden_size, config.intermediate_size, False, build.tp,
                        act_fn=GeluAndMul(_ACTIVATIONS[act]))

    def fp8_input_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The norm before the MLP is `pre_feedforward_layernorm` (`GemmaRMSNorm`s have
        no FP8 output either way)."""
        return [(self.input_layernorm, self.self_attn.qkv_proj),
                (self.pre_feedforward_layernorm, self.mlp.gate_up_proj)]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        hidden = self.post_feedforward_layernorm(self.mlp(hidden))
        return hidden, residual


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_cls: type[LlamaDecoderLayer] = Gemma2DecoderLayer

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.final_logit_softcapping = _softcap(config, "final_logit_softcapping")
        self.normalizer = float(config.hidden_size) ** 0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # HF rounds the scale to the model dtype first (a host float: graph-capture safe).
        return hidden * float(torch.tensor(self.normalizer, dtype=hidden.dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    layer_cls = Gemma3DecoderLayer
