"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral); Qwen2/Qwen3 subclass it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionImpl, AttentionMetadata
from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.models.layers.activation import SiluAndMul
from pagedllm.models.layers.attention import Attention
from pagedllm.models.layers.layernorm import RMSNorm
from pagedllm.models.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.models.layers.rotary import RotaryEmbedding
from pagedllm.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

# checkpoint name fragment -> (fused parameter fragment, shard id)
_STACKED = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TensorParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias, tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    qkv_bias: bool | None = None  # None: read config.attention_bias
    qk_norm: bool = False

    def __init__(self, config: Any, attn_impl: type[AttentionImpl], max_position: int,
                 sliding_window: int | None, tp: TensorParallelGroup) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias if self.qkv_bias is None else self.qkv_bias
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, num_heads, num_kv_heads, qkv_bias, tp
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size,
                                        attention_bias, tp)
        partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
        self.rotary_emb = RotaryEmbedding(self.head_dim, max_position, config,
                                          rotary_dim=int(self.head_dim * partial))
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(attn_impl, self.num_heads, self.head_dim, self.head_dim**-0.5,
                              self.num_kv_heads, sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            n = q.shape[0]
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim)).view(n, self.q_size)
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim)).view(n, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: Any, attn_impl: type[AttentionImpl], max_position: int,
                 sliding_window: int | None, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, attn_impl, max_position, sliding_window, tp)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size,
                            bool(getattr(config, "mlp_bias", False)), tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM over a paged KV cache: forward() returns hidden states of every
    token; compute_logits() projects the selected ones to the vocabulary."""

    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: Any, attn_impl: type[AttentionImpl], max_model_len: int,
                 sliding_window: int | None = None,
                 tp: TensorParallelGroup = SINGLE_PROCESS) -> None:
        super().__init__()
        self.config = config
        max_position = max(max_model_len, getattr(config, "max_position_embeddings", 0))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            self.layer_cls(config, attn_impl, max_position, sliding_window, tp)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named checkpoint tensors; returns the parameter names that were filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie_word_embeddings and name.startswith("lm_head."):
                continue
            shard_id: int | str | None = None
            for ckpt_part, param_part, sid in _STACKED:
                if f".{ckpt_part}." in name:
                    name, shard_id = name.replace(ckpt_part, param_part), sid
                    break
            param = params.get(name)
            if param is None:
                continue  # e.g. unused buffers; missing parameters are reported below
            loader = getattr(self.get_submodule(name.rsplit(".", 1)[0]), "weight_loader", None)
            with torch.no_grad():
                if loader is None:
                    if param.shape != tensor.shape:
                        raise ValueError(
                            f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, the "
                            f"model expects {tuple(param.shape)}."
                        )
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor.to(param.dtype), shard_id)
            loaded.add(name)
        if self.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = {n for n in params if n not in loaded}
        # q/k/v and gate/up arrive in several pieces; one is enough to mark the param.
        if missing:
            raise ValueError(
                f"The checkpoint lacks {len(missing)} model weights, e.g. {sorted(missing)[:5]}; "
                "is it complete and of the architecture config.json names?"
            )
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is a Llama with sliding-window attention in some versions."""
