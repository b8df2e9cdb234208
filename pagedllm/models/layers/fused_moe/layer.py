"""FusedMoE: the experts of one MoE layer as two stacked weights, sharded over their FFN
dimension for tensor parallelism, loaded from the checkpoint's per-expert tensors."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.models.layers.fused_moe.experts import fused_experts, triton_usable
from pagedllm.models.layers.fused_moe.routing import select_experts

# Per-expert checkpoint piece -> shard of the stacked weights (0 gate, 1 up, None down).
_PIECES: dict[str, int | None] = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1,
                                  "w2": None, "down_proj": None}
_PER_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
# transformers-5 style checkpoints may hold the experts already stacked.
_STACKED = re.compile(r"^(.*)\.experts\.(gate_up_proj|down_proj)$")

ShardId = tuple[int, int | None] | str


def expert_checkpoint_name(name: str) -> tuple[str, ShardId] | None:
    """(parameter name, shard id) of an expert tensor of the checkpoint, else None.

    `...experts.3.w1.weight` (Mixtral) / `...experts.3.gate_proj.weight` (Qwen-MoE) ->
    (`...experts.w13_weight`, (3, 0)); a stacked `...experts.gate_up_proj` -> ("...", "all")."""
    m = _PER_EXPERT.match(name)
    if m is not None:
        prefix, expert, piece = m.group(1), int(m.group(2)), m.group(3)
        shard = _PIECES[piece]
        param = "w2_weight" if shard is None else "w13_weight"
        return f"{prefix}.experts.{param}", (expert, shard)
    m = _STACKED.match(name)
    if m is not None:
        param = "w13_weight" if m.group(2) == "gate_up_proj" else "w2_weight"
        return f"{m.group(1)}.experts.{param}", "all"
    return None


class FusedMoE(nn.Module):
    """Routed experts: w13 [E, 2 * I/tp, H] (gate rows, then up rows) and w2 [E, H, I/tp].

    forward(x, router_logits) routes each token to its top_k experts and returns the weighted
    sum of their outputs; forward_with_router(x, router_weight) does the same from the
    router's weight (at one token on CUDA its product and the selection are one launch).
    With tensor parallelism each rank computes its slice of the FFN dimension and the
    partial sums are all-reduced once (unless reduce_results=False, when the caller adds
    more partial sums, e.g. a shared expert, before one reduction)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, tp: TensorParallelGroup = SINGLE_PROCESS,
                 reduce_results: bool = True,
                 checkpoint_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 checkpoint_block: str = "mlp") -> None:
        """`checkpoint_names` (gate, up, down) and `checkpoint_block` (the MoE module's name
        in the checkpoint) only shape error messages about missing expert tensors."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the number "
                             f"of experts ({num_experts}).")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.tp = tp
        self.reduce_results = reduce_results
        self.checkpoint_names = checkpoint_names
        self.checkpoint_block = checkpoint_block
        self.intermediate_per_rank = tp.shard(intermediate_size, "moe_intermediate_size")
        inter = self.intermediate_per_rank
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter),
                                      requires_grad=False)
        self._loaded: set[tuple[int, int | None]] = set()
        self._router_scratch = None  # RouterScratch of the one-token router, made on first use

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: ShardId | None = None) -> None:
        inter, rank = self.intermediate_per_rank, self.tp.rank
        if shard_id == "all":  # already stacked: [E, 2I, H] or [E, H, I]
            if param is self.w13_weight:
                full = loaded.shape[1] // 2
                parts = [loaded[:, s * full + rank * inter:s * full + (rank + 1) * inter]
                         for s in (0, 1)]
                self._copy(param.data, torch.cat(parts, dim=1), "experts.gate_up_proj")
                self._loaded.update((e, s) for e in range(self.num_experts) for s in (0, 1))
            else:
                self._copy(param.data, loaded.narrow(2, rank * inter, inter), "experts.down_proj")
                self._loaded.update((e, None) for e in range(self.num_experts))
            return
        if not isinstance(shard_id, tuple):
            raise ValueError(f"Expert tensor loaded without an expert index ({shard_id!r}).")
        expert, shard = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"The checkpoint has expert {expert}, but config.json gives "
                             f"{self.num_experts} experts.")
        if shard is None:
            self._copy(param.data[expert], loaded.narrow(1, rank * inter, inter),
                       f"experts.{expert}.{self.checkpoint_names[2]}")
        else:
            self._copy(param.data[expert].narrow(0, shard * inter, inter),
                       loaded.narrow(0, rank * inter, inter),
                       f"experts.{expert}.{self.checkpoint_names[shard]}")
        self._loaded.add((expert, shard))

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"Checkpoint tensor {name} has shape {tuple(src.shape)} for this "
                             f"rank, the model expects {tuple(dst.shape)}: the weights do not "
                             "match config.json.")
        dst.copy_(src)

    def check_loaded(self, module_name: str) -> None:
        """ValueError naming the first expert tensor the checkpoint did not provide."""
        shards = (0, 1, None)
        for expert in range(self.num_experts):
            for shard in shards:
                if (expert, shard) not in self._loaded:
                    piece = self.checkpoint_names[2 if shard is None else shard]
                    layer = module_name.removesuffix(".experts").rsplit(".", 1)[0]
                    prefix = f"model.{layer}.{self.checkpoint_block}"
                    missing = self.num_experts * 3 - len(self._loaded)
                    raise ValueError(
                        f"The checkpoint lacks {missing} expert tensors, e.g. "
                        f"{prefix}.experts.{expert}.{piece}.weight; is it complete and of the "
                        "architecture (and num_experts) config.json names?")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self._run_experts(x, weights, ids)

    def forward_with_router(self, x: torch.Tensor, router_weight: torch.Tensor
                            ) -> torch.Tensor:
        """forward(x, x @ router_weight^T), router_weight [E, H] in x's dtype."""
        if (x.shape[0] == 1 and triton_usable(x) and router_weight.dtype == x.dtype
                and router_weight.stride(1) == 1):
            from pagedllm.models.layers.fused_moe.triton_routing import (
                RouterScratch,
                router_topk_one_token,
            )

            scratch = self._router_scratch
            if scratch is None or not scratch.fits(self.num_experts, x.dtype, x.device):
                scratch = self._router_scratch = RouterScratch(self.num_experts, x.dtype,
                                                               x.device)
            weights, ids = router_topk_one_token(x, router_weight, self.top_k,
                                                 self.renormalize, scratch)
            return self._run_experts(x, weights, ids)
        return self.forward(x, F.linear(x, router_weight))

    def _run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                     ) -> torch.Tensor:
        out = fused_experts(x, self.w13_weight, self.w2_weight, weights, ids)
        return self.tp.all_reduce(out) if self.reduce_results else out
