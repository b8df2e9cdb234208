"""CUDA graphs for steps whose requests all have the same query length: decode steps (one
token each) and, when speculating, verify steps (1 + k tokens each). Captured once per
(batch size, query length); decode batches are padded to the next captured size at run
time, verify batches are captured at every size up to MAX_VERIFY_BATCH and never padded:
a verify step then runs the very kernels on the very shapes an eager one would, so that
speculation's greedy output does not depend on whether its verify step replayed a graph
(padding changes the GEMMs' row count, which can change their rounding in bf16)."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionMetadata

MAX_VERIFY_BATCH = 16  # verify graphs are captured for each batch size up to this


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch_size (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    """Static input buffers and one captured graph per (batch size, query length).

    Query length 1 is captured for the batch sizes of `capture_sizes(max_batch_size)`;
    each of `verify_query_lens` (speculation's 1 + k for k = 1..num_speculative_tokens) for
    every batch size up to `max_verify_batch`. A step runs from a graph when every request
    has the same query length and that length was captured; a decode batch's requests past
    its own are padding (no KV written, nothing attended)."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], device: torch.device,
                 max_batch_size: int, max_blocks_per_seq: int,
                 verify_query_lens: tuple[int, ...] = (),
                 max_verify_batch: int = MAX_VERIFY_BATCH) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = capture_sizes(max_batch_size)
        self.verify_sizes = list(range(1, min(max_verify_batch, max_batch_size) + 1))
        self.verify_query_lens = tuple(q for q in verify_query_lens if q > 1)
        n = self.sizes[-1]
        tokens = max([n, *(self.verify_sizes[-1] * q for q in self.verify_query_lens)])
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        # query_start_loc of each query length: 0, q, 2q, ...
        self.query_start_loc = {q: torch.arange(n + 1, dtype=torch.int32, device=device) * q
                                for q in (1, *self.verify_query_lens)}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.verify_replays = 0  # replays with query length > 1 (tests read it)

    def release(self) -> None:
        """Drop the graphs, their memory pool and the references to the model and its KV
        cache, so that the memory goes back even while this object is still referenced."""
        self.graphs.clear()
        self.outputs.clear()
        self.model = None  # type: ignore[assignment]
        self.kv_caches = []

    def _metadata(self, bs: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=bs * q, num_reqs=bs, max_query_len=q,
            max_seq_len=self.block_table.shape[1],
            query_start_loc=self.query_start_loc[q][: bs + 1], seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs], slot_mapping=self.slot_mapping[: bs * q],
            query_start_loc_cpu=torch.arange(bs + 1, dtype=torch.int32) * q,
            seq_lens_cpu=torch.full((bs,), q, dtype=torch.int32), is_decode_only=q == 1)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        shapes = [(bs, 1) for bs in self.sizes]
        shapes += [(bs, q) for q in self.verify_query_lens for bs in self.verify_sizes]
        # Most tokens first, so that smaller graphs reuse the memory of larger ones.
        for bs, q in sorted(shapes, key=lambda s: -s[0] * s[1]):
            self.seq_lens.fill_(q)
            md = self._metadata(bs, q)
            n = bs * q
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the graph
                self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, md)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, md)
            self.graphs[bs, q] = graph
            self.outputs[bs, q] = out
        self.seq_lens.zero_()
        torch.cuda.synchronize(self.device)

    def lookup(self, md: AttentionMetadata) -> tuple[int, int] | None:
        """The captured (batch size, query length) to run this step with, or None to run
        it eagerly."""
        if md.block_table.shape[1] > self.block_table.shape[1]:
            return None
        if md.is_decode_only:
            if md.num_reqs > self.sizes[-1]:
                return None
            return self.sizes[bisect.bisect_left(self.sizes, md.num_reqs)], 1
        q = md.max_query_len
        if (q not in self.verify_query_lens or md.num_reqs > self.verify_sizes[-1]
                or md.num_actual_tokens != md.num_reqs * q):  # not every request has q
            return None
        return md.num_reqs, q  # exact: verify graphs are never padded

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            md: AttentionMetadata) -> torch.Tensor:
        """The model's hidden states for this step: from a captured graph when its shape
        has one, else an eager forward."""
        key = self.lookup(md)
        if key is None:
            return self.model(input_ids, positions, self.kv_caches, md)
        return self.replay(key, input_ids, positions, md)

    def replay(self, key: tuple[int, int], input_ids: torch.Tensor, positions: torch.Tensor,
               md: AttentionMetadata) -> torch.Tensor:
        bs, q = key
        n = md.num_reqs
        tokens = n * q
        self.input_ids[:tokens].copy_(input_ids[:tokens], non_blocking=True)
        self.positions[:tokens].copy_(positions[:tokens], non_blocking=True)
        self.slot_mapping[:tokens].copy_(md.slot_mapping[:tokens], non_blocking=True)
        self.seq_lens[:n].copy_(md.seq_lens, non_blocking=True)
        cols = md.block_table.shape[1]
        self.block_table[:n, :cols].copy_(md.block_table, non_blocking=True)
        if bs > n:  # decode padding (verify batches are exact)
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.graphs[key].replay()
        self.verify_replays += q > 1
        return self.outputs[key][:tokens]
