"""Phi-3 / Phi-4-mini: a Llama whose checkpoint fuses q/k/v (`qkv_proj`) and gate/up
(`gate_up_proj`); longrope ("su") rope scaling and partial rotary dimensions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pagedllm.models.llama import LlamaForCausalLM, head_dim_of


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's fused tensors as the q/k/v and gate/up pieces that the
        tensor-parallel layers shard."""
        config = self.config
        head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        q_size = config.num_attention_heads * head_dim
        kv_size = num_kv_heads * head_dim
        for name, tensor in weights:
            if name.endswith(".qkv_proj.weight"):
                if tensor.shape[0] != q_size + 2 * kv_size:
                    raise ValueError(
                        f"Checkpoint tensor {name} has {tensor.shape[0]} rows; config.json "
                        f"implies {q_size + 2 * kv_size} (q {q_size} + k/v {kv_size} each).")
                q, k, v = tensor.split([q_size, kv_size, kv_size])
                stem = name.removesuffix("qkv_proj.weight")
                yield from ((f"{stem}q_proj.weight", q), (f"{stem}k_proj.weight", k),
                            (f"{stem}v_proj.weight", v))
            elif name.endswith(".gate_up_proj.weight"):
                if tensor.shape[0] != 2 * config.intermediate_size:
                    raise ValueError(
                        f"Checkpoint tensor {name} has {tensor.shape[0]} rows; config.json "
                        f"implies {2 * config.intermediate_size} (2 x intermediate_size).")
                gate, up = tensor.chunk(2)
                stem = name.removesuffix("gate_up_proj.weight")
                yield f"{stem}gate_proj.weight", gate
                yield f"{stem}up_proj.weight", up
            else:
                yield name, tensor
