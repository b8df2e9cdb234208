"""Tensor-parallel-aware linear layers (Megatron style); with one process they are plain.

Each layer knows its shard and loads its slice of a full checkpoint tensor through
`weight_loader(param, loaded_weight, shard_id)`. A layer whose `packed` is set (GGUF weights
kept quantized on the CPU, `layers/quantized.PackedWeight`) has no dense weight and runs
the packed matmul; bias, reduce and gather stay as they are. `packed` is any module computing
x W^T: GGUF's `PackedWeight` (CPU), or `pagedllm.quantization`'s FP8 and 4-bit weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.models.layers.quantized import PackedWeight


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"Checkpoint tensor for {name} has shape {tuple(loaded.shape)}, the model expects "
            f"{tuple(param.shape)}: the weights do not match config.json."
        )
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along the output dimension across ranks."""

    packed: PackedWeight | None = None

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_PROCESS, gather_output: bool = False) -> None:
        super().__init__()
        self.tp = tp
        self.gather_output = gather_output
        self.output_size_per_rank = tp.shard(output_size, "output size")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(self.output_size_per_rank), requires_grad=False)
                     if bias else None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        size = param.shape[0]
        loaded = loaded.narrow(0, self.tp.rank * size, size)
        _copy_checked(param, loaded, type(self).__name__)

    def piece_rows(self, shard_id: int | str | None) -> tuple[int, int]:
        """(offset, size) of checkpoint piece `shard_id`'s rows in this rank's weight."""
        del shard_id
        return 0, self.output_size_per_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = self.packed(x)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x, self.weight, self.bias)
        return self.tp.all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused in one matrix (e.g. gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_PROCESS) -> None:
        super().__init__(input_size, sum(output_sizes), bias, tp)
        self.shard_sizes = [tp.shard(s, "output size") for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        assert isinstance(shard_id, int)
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        loaded = loaded.narrow(0, self.tp.rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), loaded, type(self).__name__)

    def piece_rows(self, shard_id: int | str | None) -> tuple[int, int]:
        assert isinstance(shard_id, int)
        return sum(self.shard_sizes[:shard_id]), self.shard_sizes[shard_id]

    def forward_gated(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """act(x W^T) for a gate / up pair: one kernel where the packed weight fuses the
        activation for these rows (`gated`, e.g. the quantized one-row GEMVs), else the
        projection and then `act`. `act` names what it computes in `gated_name`."""
        name = getattr(act, "gated_name", None)
        halves = len(self.shard_sizes) == 2 and self.shard_sizes[0] == self.shard_sizes[1]
        fused = getattr(self.packed, "gated", None) if self.bias is None and halves else None
        if name is not None and fused is not None:
            y = fused(x, name)
            if y is not None:
                return y
        return act(self.forward(x))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; KV heads are split across ranks, or replicated when fewer."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TensorParallelGroup = SINGLE_PROCESS) -> None:
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        if num_kv_heads >= tp.world_size:
            self.num_kv_heads = tp.shard(num_kv_heads, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            if tp.world_size % num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size={tp.world_size} must be a multiple of "
                    f"num_key_value_heads={num_kv_heads} when it is larger."
                )
            self.num_kv_heads = 1
            self.kv_replicas = tp.world_size // num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.world_size
        super().__init__(hidden_size, out, bias, tp)

    def piece_rows(self, shard_id: int | str | None) -> tuple[int, int]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q_size
        return (q_size, kv_size) if shard_id == "k" else (q_size + kv_size, kv_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        offset, size = self.piece_rows(shard_id)
        rank = self.tp.rank if shard_id == "q" else self.tp.rank // self.kv_replicas
        loaded = loaded.narrow(0, rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), loaded, f"qkv_proj.{shard_id}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along the input dimension; partial sums all-reduced
    (unless reduce_results=False: the caller reduces once for several partial sums)."""

    packed: PackedWeight | None = None

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_PROCESS, reduce_results: bool = True) -> None:
        super().__init__()
        self.tp = tp
        self.reduce_results = reduce_results
        if bias and not reduce_results and tp.world_size > 1:
            raise ValueError("A row-parallel layer with a bias must reduce its own results.")
        self.input_size_per_rank = tp.shard(input_size, "input size")
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        if param is self.bias:
            _copy_checked(param, loaded, "row-parallel bias")
            return
        size = param.shape[1]
        loaded = loaded.narrow(1, self.tp.rank * size, size)
        _copy_checked(param, loaded, type(self).__name__)

    def piece_rows(self, shard_id: int | str | None) -> tuple[int, int]:
        """(offset, size) of the checkpoint piece's rows: all of them (not split)."""
        del shard_id
        return 0, self.output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed(x) if self.packed is not None else F.linear(x, self.weight)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y
