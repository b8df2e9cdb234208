"""Vocabulary-parallel token embedding and LM head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.models.layers.quantized import PackedWeight, tile_kernels
from pagedllm.utils import cdiv


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split across ranks; `packed` (int8 rows,
    one process) replaces the dense weight of a GGUF checkpoint kept quantized."""

    packed: PackedWeight | None = None

    def __init__(self, vocab_size: int, hidden_size: int,
                 tp: TensorParallelGroup = SINGLE_PROCESS) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = cdiv(vocab_size, tp.world_size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size),
                                   requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] < self.vocab_size:
            raise ValueError(
                f"Embedding tensor has shape {tuple(loaded.shape)}, expected "
                f"({self.vocab_size}, {param.shape[1]}): the weights do not match config.json."
            )
        rows = min(self.rows_per_rank, loaded.shape[0] - self.vocab_start)
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.vocab_start:self.vocab_start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.embed(input_ids)
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


# Rows of hidden states from which a packed int8 bf16 LM head runs as a dense bf16 matmul:
# int8pack_mm costs in proportion to the rows (49,152 x 576 at one thread: 1.8 ms at 1 row,
# 5.9 at 8, 23.4 at 32), a dense bf16 matmul hardly does (3.5, 3.7, 4.5 ms).
DENSE_HEAD_MIN_ROWS = 6


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; each rank computes its slice of the logits."""

    _dense: torch.Tensor | None = None  # a packed int8 head's W in bf16, once many rows come

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            tiled = self._tiled_head()
            if tiled is not None:  # float32 logits from the CPU kernels
                logits = tiled(hidden_states.to(torch.bfloat16).contiguous())
            elif (hidden_states.shape[0] >= DENSE_HEAD_MIN_ROWS and self.packed.kind == "int8"
                    and self.packed.dtype == torch.bfloat16):
                if self._dense is None:
                    self._dense = self.packed.dequantized()
                logits = F.linear(hidden_states.to(torch.bfloat16), self._dense)
            else:
                logits = self.packed(hidden_states)
        else:
            logits = F.linear(hidden_states, self.weight)
        logits = self.tp.all_gather(logits)
        return logits[..., : self.vocab_size]

    def _tiled_head(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A packed int8 bf16 head as the CPU kernels' int8 matmul (tiles made at the first
        call: 2.3 ms against 7.8 for the dense bf16 copy at 8 rows on an AMD EPYC, float32
        logits without bf16's rounding ties), or None where the kernels lack it."""
        tiled = self.__dict__.get("_tiled")
        if tiled is None:
            tiled = self.__dict__["_tiled"] = self._make_tiled_head() or False
        return tiled or None

    def _make_tiled_head(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.packed.kind != "int8" or self.packed.dtype is not torch.bfloat16:
            return None
        from pagedllm.cpu_kernels import ops

        kernels = tile_kernels()
        if kernels is None or not kernels.has_int8:
            return None
        return kernels.int8_matmul(*ops.int8_tiles(self.packed.codes, self.packed.scales))
