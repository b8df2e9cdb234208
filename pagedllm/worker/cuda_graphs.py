"""CUDA graphs for decode-only steps: captured once per batch size, padded at run time."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionMetadata


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch_size (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    """Holds static input buffers and one captured graph per decode batch size."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], device: torch.device,
                 max_batch_size: int, max_blocks_per_seq: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = capture_sizes(max_batch_size)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=bs, num_reqs=bs, max_query_len=1,
            max_seq_len=self.block_table.shape[1],
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs], slot_mapping=self.slot_mapping[:bs],
            query_start_loc_cpu=torch.arange(bs + 1, dtype=torch.int32),
            seq_lens_cpu=torch.ones(bs, dtype=torch.int32), is_decode_only=True)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        self.seq_lens.fill_(1)
        for bs in reversed(self.sizes):  # largest first, so smaller ones reuse its memory
            md = self._metadata(bs)
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the graph
                self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, md)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, md)
            self.graphs[bs] = graph
            self.outputs[bs] = out
        self.seq_lens.zero_()
        torch.cuda.synchronize(self.device)

    def lookup(self, md: AttentionMetadata) -> int | None:
        """The captured size to run this batch with, or None to run eagerly."""
        if not md.is_decode_only or md.num_reqs > self.sizes[-1]:
            return None
        if md.block_table.shape[1] > self.block_table.shape[1]:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, md.num_reqs)]

    def replay(self, bs: int, input_ids: torch.Tensor, positions: torch.Tensor,
               md: AttentionMetadata) -> torch.Tensor:
        n = md.num_reqs
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(md.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(md.seq_lens, non_blocking=True)
        cols = md.block_table.shape[1]
        self.block_table[:n, :cols].copy_(md.block_table, non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
