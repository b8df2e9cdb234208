"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3 attention (q/k RMSNorm) with routed experts."""

from __future__ import annotations

from pagedllm.models.moe import MoeForCausalLM, QwenMoeDecoderLayer
from pagedllm.models.qwen3 import Qwen3Attention


class Qwen3MoeDecoderLayer(QwenMoeDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3MoeForCausalLM(MoeForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
