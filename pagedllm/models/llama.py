"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral); the other decoders subclass it.

Extension points for a family: `LlamaAttention.settings` (per-layer window, scale, softcap,
rope), `LlamaDecoderLayer.make_mlp` (dense or MoE), `LlamaForCausalLM.checkpoint_name`
(checkpoint tensor -> parameter and shard).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionImpl, AttentionMetadata
from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.models.cpu_decode import CpuDecodePath
from pagedllm.models.interface import KVCacheSpec
from pagedllm.models.layers import fused_ops
from pagedllm.models.layers.activation import SiluAndMul
from pagedllm.models.layers.attention import Attention
from pagedllm.models.layers.layernorm import RMSNorm
from pagedllm.models.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.models.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

_UNBUILT = object()  # LlamaForCausalLM._cpu_decode before its first CPU decode step

# checkpoint name fragment -> (fused parameter fragment, shard id)
_STACKED = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


@dataclass(frozen=True)
class DecoderBuild:
    """What every layer of a decoder is built from."""

    config: Any  # the HF config
    attn_impl: type[AttentionImpl]
    max_model_len: int
    max_position: int  # rotary cache length
    sliding_window: int | None  # the engine's window for layers that use the global one
    tp: TensorParallelGroup
    # Rotary modules by their settings: layers with equal rope share one (one table in
    # memory, cos / sin gathered once per step; Gemma 3's local and global layers two).
    _rotary: dict[tuple, RotaryEmbedding] = field(default_factory=dict, compare=False)

    def rotary(self, head_dim: int, rotary_dim: int,
               params: dict[str, Any] | None) -> RotaryEmbedding:
        """The rotary embedding of a layer with these settings (`params` None: the
        config's rope), made once per distinct settings."""
        key = (head_dim, rotary_dim, None if params is None else repr(sorted(params.items())))
        module = self._rotary.get(key)
        if module is None:
            module = self._rotary[key] = RotaryEmbedding(
                head_dim, self.max_position, self.config, rotary_dim=rotary_dim,
                params=params, max_model_len=self.max_model_len)
        return module


@dataclass(frozen=True)
class AttentionSettings:
    """One layer's attention: window (None = full), score scale, softcap and rope."""

    sliding_window: int | None
    scale: float
    logits_soft_cap: float | None = None
    rope_parameters: dict[str, Any] | None = None  # None: the config's own


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TensorParallelGroup,
                 act_fn: nn.Module | None = None, reduce_results: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias, tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, tp, reduce_results)
        self.act_fn = act_fn or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_gated(x, self.act_fn))

    def fp8_input_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(producer, linear) pairs where the linear reads that output and nothing else
        does: an FP8 linear may take it quantized (`quantization.loader`)."""
        return [(self.act_fn, self.down_proj)]


class LlamaAttention(nn.Module):
    qkv_bias: bool | None = None  # None: read config.attention_bias
    qk_norm: bool = False

    def __init__(self, build: DecoderBuild, layer_idx: int) -> None:
        super().__init__()
        config, tp = build.config, build.tp
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim_of(config)
        settings = self.settings(build, layer_idx)
        self.sliding_window = settings.sliding_window
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = (bool(getattr(config, "qkv_bias", attention_bias)) if self.qkv_bias is None
                    else self.qkv_bias)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, num_heads, num_kv_heads, qkv_bias, tp
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size,
                                        attention_bias, tp)
        partial = (rope_parameters(config).get("partial_rotary_factor")
                   or getattr(config, "partial_rotary_factor", None) or 1.0)
        self.rotary_emb = build.rotary(self.head_dim, int(self.head_dim * partial),
                                       settings.rope_parameters)
        self.fused_qk_norm_rotary = False
        if self.qk_norm:
            self.q_norm = self.make_norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.make_norm(self.head_dim, config.rms_norm_eps)
            # plain RMSNorm heads and a whole-head rotary: one kernel for both on CUDA
            self.fused_qk_norm_rotary = (
                fused_ops.enabled() and type(self.q_norm) is RMSNorm
                and type(self.k_norm) is RMSNorm and self.q_norm.eps == self.k_norm.eps
                and type(self.rotary_emb) is RotaryEmbedding
                and self.rotary_emb.rotary_dim == self.head_dim)
        self.attn = Attention(build.attn_impl, self.num_heads, self.head_dim, settings.scale,
                              self.num_kv_heads, settings.sliding_window,
                              settings.logits_soft_cap)

    @classmethod
    def settings(cls, build: DecoderBuild, layer_idx: int) -> AttentionSettings:
        """Layer `layer_idx`'s attention settings; families override (Gemma). The engine's
        window applies to the layers that config.layer_types marks "sliding_attention"
        (to all layers where the config has no layer_types)."""
        window = build.sliding_window
        layer_types = getattr(build.config, "layer_types", None)
        if window is not None and layer_types and layer_idx < len(layer_types):
            window = window if layer_types[layer_idx] == "sliding_attention" else None
        return AttentionSettings(window, head_dim_of(build.config) ** -0.5)

    @staticmethod
    def make_norm(size: int, eps: float) -> nn.Module:
        return RMSNorm(size, eps)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim, self.sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.fused_qk_norm_rotary and fused_ops.usable(q):
            rotary = self.rotary_emb
            fused_ops.qk_norm_rotary_inplace(positions, q, k, self.q_norm.weight,
                                             self.k_norm.weight, self.q_norm.eps,
                                             rotary.cos_cache, rotary.sin_cache, self.head_dim)
            return self.o_proj(self.attn(q, k, v, kv_cache, metadata))
        if self.qk_norm:
            n = q.shape[0]
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim)).view(n, self.q_size)
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim)).view(n, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, build: DecoderBuild, layer_idx: int) -> None:
        super().__init__()
        config = build.config
        self.self_attn = self.attention_cls(build, layer_idx)
        self.mlp = self.make_mlp(build, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, build: DecoderBuild, layer_idx: int) -> nn.Module:
        """The feed-forward part of layer `layer_idx` (families with experts override)."""
        config = build.config
        return LlamaMLP(config.hidden_size, config.intermediate_size,
                        bool(getattr(config, "mlp_bias", False)), build.tp)

    def fp8_input_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """As `LlamaMLP.fp8_input_pairs`: each norm feeds one projection (the MoE block's
        router reads the second norm too, so that pair is a dense MLP's only)."""
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (self.input_layernorm, self.self_attn.qkv_proj)]
        if isinstance(self.mlp, LlamaMLP):
            pairs.append((self.post_attention_layernorm, self.mlp.gate_up_proj))
        return pairs

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
        build = DecoderBuild(config, attn_impl, max_model_len, max_position, sliding_window, tp)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            self.layer_cls(build, i) for i in range(config.num_hidden_layers)
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
        if input_ids.device.type == "cpu" and CpuDecodePath.applies(input_ids, kv_caches,
                                                                     metadata):
            path = self.__dict__.get("_cpu_decode", _UNBUILT)
            if path is _UNBUILT:  # first CPU decode step, weights loaded: once
                path = self.__dict__["_cpu_decode"] = CpuDecodePath.build(self)
            if path is not None:
                return path(input_ids, positions, kv_caches, metadata)
        hidden = self.embed(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        return [layer.self_attn.kv_cache_spec() for layer in self.layers]

    def checkpoint_name(self, name: str) -> tuple[str, int | str | tuple[int, int] | None]:
        """A checkpoint tensor's parameter name (without "model.") and shard id."""
        for ckpt_part, param_part, sid in _STACKED:
            if f".{ckpt_part}." in name:
                return name.replace(ckpt_part, param_part), sid
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named checkpoint tensors; returns the parameter names that were filled."""
        self.__dict__.pop("_cpu_decode", None)  # built from the old weights
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie_word_embeddings and name.startswith("lm_head."):
                continue
            name, shard_id = self.checkpoint_name(name)
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
        for module_name, module in self.named_modules():
            check = getattr(module, "check_loaded", None)
            if check is not None:  # stacked parameters (experts) name their missing pieces
                check(module_name)
        missing = {n for n in params if n not in loaded}
        # q/k/v and gate/up arrive in several pieces; one is enough to mark the param.
        if missing:
            raise ValueError(
                f"The checkpoint lacks {len(missing)} model weights, e.g. {sorted(missing)[:5]}; "
                "is it complete and of the architecture config.json names?"
            )
        return loaded


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is a Llama with sliding-window attention in some versions."""
