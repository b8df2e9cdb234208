"""Qwen2-MoE (Qwen1.5-MoE): routed experts plus a shared expert behind a sigmoid gate."""

from __future__ import annotations

from pagedllm.models.moe import MoeForCausalLM, QwenMoeDecoderLayer


class Qwen2MoeDecoderLayer(QwenMoeDecoderLayer):
    shared_expert = True


class Qwen2MoeForCausalLM(MoeForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer
