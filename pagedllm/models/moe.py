"""Decoder layers whose feed-forward is a sparse mixture of experts (Mixtral, Qwen-MoE)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.distributed.group import TensorParallelGroup
from pagedllm.models.layers.fused_moe import FusedMoE, expert_checkpoint_name
from pagedllm.models.llama import DecoderBuild, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


def num_experts_of(config: Any) -> int:
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)
               or 0)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ an optional shared expert with a sigmoid gate, Qwen2-MoE);
    one all-reduce per layer under tensor parallelism."""

    def __init__(self, config: Any, tp: TensorParallelGroup, intermediate_size: int,
                 renormalize: bool, shared_intermediate_size: int = 0,
                 checkpoint_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 checkpoint_block: str = "mlp") -> None:
        super().__init__()
        hidden = config.hidden_size
        num_experts = num_experts_of(config)
        self.tp = tp
        self.gate = nn.Linear(hidden, num_experts, bias=False).requires_grad_(False)
        self.experts = FusedMoE(num_experts, int(config.num_experts_per_tok), hidden,
                                intermediate_size, renormalize, tp, reduce_results=False,
                                checkpoint_names=checkpoint_names,
                                checkpoint_block=checkpoint_block)
        self.shared_expert: LlamaMLP | None = None
        if shared_intermediate_size:
            self.shared_expert = LlamaMLP(hidden, shared_intermediate_size, False, tp,
                                          reduce_results=False)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts.forward_with_router(x, self.gate.weight)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)


class QwenMoeDecoderLayer(LlamaDecoderLayer):
    """Qwen2/3-MoE layer: experts every `decoder_sparse_step` layers, except
    `mlp_only_layers`, which keep a dense MLP of `intermediate_size`."""

    shared_expert: bool = False

    def make_mlp(self, build: DecoderBuild, layer_idx: int) -> nn.Module:
        config = build.config
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense = (layer_idx in (getattr(config, "mlp_only_layers", None) or [])
                 or num_experts_of(config) == 0 or (layer_idx + 1) % step != 0)
        if dense:
            return super().make_mlp(build, layer_idx)
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        return SparseMoeBlock(config, build.tp, int(config.moe_intermediate_size),
                              bool(getattr(config, "norm_topk_prob", False)),
                              shared if self.shared_expert else 0)


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-style decoder whose checkpoint stores each expert's tensors separately; they
    are stacked into the FusedMoE parameters at load."""

    checkpoint_block = "mlp"  # the MoE module's name in the checkpoint

    def checkpoint_name(self, name: str) -> tuple[str, Any]:
        if self.checkpoint_block != "mlp":
            name = name.replace(f".{self.checkpoint_block}.", ".mlp.")
        mapped = expert_checkpoint_name(name)
        return mapped if mapped is not None else super().checkpoint_name(name)
