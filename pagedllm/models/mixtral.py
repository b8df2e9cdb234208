"""Mixtral: a Mistral whose every MLP is a sparse MoE (softmax router, renormalized top-k)."""

from __future__ import annotations

from torch import nn

from pagedllm.models.llama import DecoderBuild, LlamaDecoderLayer
from pagedllm.models.moe import MoeForCausalLM, SparseMoeBlock


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, build: DecoderBuild, layer_idx: int) -> nn.Module:
        config = build.config
        return SparseMoeBlock(config, build.tp, int(config.intermediate_size), renormalize=True,
                              checkpoint_names=("w1", "w3", "w2"),
                              checkpoint_block="block_sparse_moe")


class MixtralForCausalLM(MoeForCausalLM):
    layer_cls = MixtralDecoderLayer
    checkpoint_block = "block_sparse_moe"
