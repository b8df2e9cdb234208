"""CUDA graphs for the model's forward: decode steps (one token per request), mixed steps
(prefill chunks with decodes) and, when speculating, verify steps (1 + k tokens each).

Decode graphs are captured once per batch size and a decode batch is padded to the next
captured size. Mixed graphs are captured once per token count (`mixed_capture_sizes`) for
up to `max_num_reqs` requests: a mixed step's tokens are padded to the next captured count
and its request list with empty requests, which the attention kernel skips (its grid
depends on those two counts only). Without them a mixed step's forward is launched op by
op, which on a large model costs milliseconds of host time per step: the time in which a
grammar or a busy front-end needs the host. Verify batches are captured at every size up
to MAX_VERIFY_BATCH and never padded, and speculation captures no mixed graphs: a verify
step then runs the very kernels on the very shapes an eager one would, so that
speculation's greedy output does not depend on whether it replayed a graph (padding
changes the GEMMs' row count, which can change their rounding in bf16)."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionMetadata

MAX_VERIFY_BATCH = 16  # verify graphs are captured for each batch size up to this
MIXED = 0  # the query length in the key of a mixed graph: (token count, MIXED)


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch_size (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts of the mixed graphs: 32, 64, 128, 256, then 2^k and 1.5 x 2^k (384,
    512, 768, 1024, 1536, ...) below max_tokens, and max_tokens itself. Padding at most
    doubles a small step's tokens and adds at most half to a large one's."""
    sizes = [32, 64, 128]
    power = 256
    while power < max_tokens:
        sizes += [power, power * 3 // 2]
        power *= 2
    return [s for s in sizes if s < max_tokens] + [max_tokens]


class StepGraphs:
    """Static input buffers and one captured graph per (batch size, query length), or per
    (token count, MIXED).

    Query length 1 is captured for the batch sizes of `capture_sizes(max_batch_size)`;
    each of `verify_query_lens` (speculation's 1 + k for k = 1..num_speculative_tokens) for
    every batch size up to `max_verify_batch`; mixed steps (any query lengths) for the token
    counts of `mixed_capture_sizes(max_mixed_tokens)` and up to `max_num_reqs` requests
    (none when max_mixed_tokens is 0 or when speculating). A step's padding tokens write no
    KV; its padding requests are empty (nothing attended)."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], device: torch.device,
                 max_batch_size: int, max_blocks_per_seq: int,
                 verify_query_lens: tuple[int, ...] = (),
                 max_verify_batch: int = MAX_VERIFY_BATCH, max_mixed_tokens: int = 0,
                 max_num_reqs: int = 0) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = capture_sizes(max_batch_size)
        self.verify_sizes = list(range(1, min(max_verify_batch, max_batch_size) + 1))
        self.verify_query_lens = tuple(q for q in verify_query_lens if q > 1)
        speculating = bool(self.verify_query_lens)
        self.mixed_sizes = (mixed_capture_sizes(max_mixed_tokens)
                            if max_mixed_tokens > 0 and not speculating else [])
        self.max_num_reqs = max(max_num_reqs, self.sizes[-1])
        n = self.sizes[-1]
        tokens = max([n, *(self.verify_sizes[-1] * q for q in self.verify_query_lens),
                      *self.mixed_sizes[-1:]])
        reqs = self.max_num_reqs if self.mixed_sizes else n
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(reqs, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(reqs, max_blocks_per_seq, dtype=torch.int32,
                                       device=device)
        # query_start_loc of each query length: 0, q, 2q, ...; MIXED: each replay's own
        self.query_start_loc = {q: torch.arange(n + 1, dtype=torch.int32, device=device) * q
                                for q in (1, *self.verify_query_lens)}
        self.query_start_loc[MIXED] = torch.zeros(reqs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.verify_replays = 0  # replays with query length > 1 (tests read it)
        self.mixed_replays = 0  # replays of mixed graphs (tests read it)

    def _mixed_reqs(self, tokens: int) -> int:
        """How many requests the mixed graph of `tokens` tokens takes."""
        return min(tokens, self.max_num_reqs)

    def release(self) -> None:
        """Drop the graphs, their memory pool and the references to the model and its KV
        cache, so that the memory goes back even while this object is still referenced."""
        self.graphs.clear()
        self.outputs.clear()
        self.model = None  # type: ignore[assignment]
        self.kv_caches = []

    def _metadata(self, bs: int, q: int) -> AttentionMetadata:
        if q == MIXED:  # bs: the token count; the requests' split comes with each replay
            reqs = self._mixed_reqs(bs)
            return AttentionMetadata(
                num_actual_tokens=bs, num_reqs=reqs, max_query_len=bs,
                max_seq_len=self.block_table.shape[1],
                query_start_loc=self.query_start_loc[MIXED][: reqs + 1],
                seq_lens=self.seq_lens[:reqs], block_table=self.block_table[:reqs],
                slot_mapping=self.slot_mapping[:bs],
                query_start_loc_cpu=torch.zeros(reqs + 1, dtype=torch.int32),
                seq_lens_cpu=torch.zeros(reqs, dtype=torch.int32), is_decode_only=False)
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
        shapes += [(tokens, MIXED) for tokens in self.mixed_sizes]
        # Most tokens first, so that smaller graphs reuse the memory of larger ones.
        for bs, q in sorted(shapes, key=lambda s: -s[0] * max(s[1], 1)):
            n = bs * q if q != MIXED else bs
            if q == MIXED:  # the tokens split evenly over the graph's requests
                reqs = self._mixed_reqs(n)
                starts = torch.arange(reqs + 1, device=self.device) * -(-n // reqs)
                qsl = self.query_start_loc[MIXED]
                qsl[:reqs + 1] = starts.clamp_(max=n)
                self.seq_lens[:reqs] = qsl[1:reqs + 1] - qsl[:reqs]
            else:
                self.seq_lens.fill_(q)
            md = self._metadata(bs, q)
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the graph
                self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, md)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, md)
            self.graphs[bs, q] = graph
            self.outputs[bs, q] = out
        self.seq_lens.zero_()
        self.query_start_loc[MIXED].zero_()
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
        if (q in self.verify_query_lens and md.num_reqs <= self.verify_sizes[-1]
                and md.num_actual_tokens == md.num_reqs * q):  # every request has q
            return md.num_reqs, q  # exact: verify graphs are never padded
        tokens = md.num_actual_tokens
        if not self.mixed_sizes or tokens > self.mixed_sizes[-1]:
            return None
        size = self.mixed_sizes[bisect.bisect_left(self.mixed_sizes, tokens)]
        if md.num_reqs > self._mixed_reqs(size):
            return None
        return size, MIXED

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
        """Copy the step into the static buffers and replay graph `key`: the step's tokens,
        then padding tokens (no KV written); its requests, then empty ones up to the graph's
        request count (decode and mixed graphs; verify graphs are exact, never padded)."""
        size, q = key
        tokens, n = md.num_actual_tokens, md.num_reqs
        token_pad, req_pad = (size, self._mixed_reqs(size)) if q == MIXED else (size * q, size)
        self.input_ids[:tokens].copy_(input_ids[:tokens], non_blocking=True)
        self.positions[:tokens].copy_(positions[:tokens], non_blocking=True)
        self.slot_mapping[:tokens].copy_(md.slot_mapping[:tokens], non_blocking=True)
        self.seq_lens[:n].copy_(md.seq_lens[:n], non_blocking=True)
        cols = md.block_table.shape[1]
        self.block_table[:n, :cols].copy_(md.block_table[:n], non_blocking=True)
        if token_pad > tokens:
            self.slot_mapping[tokens:token_pad].fill_(-1)
        if req_pad > n:
            self.seq_lens[n:req_pad].zero_()
        if q == MIXED:  # decode and verify graphs keep their fixed 0, q, 2q, ...
            qsl = self.query_start_loc[MIXED]
            qsl[:n + 1].copy_(md.query_start_loc[:n + 1], non_blocking=True)
            qsl[n + 1:req_pad + 1].fill_(tokens)
        self.graphs[key].replay()
        self.verify_replays += q > 1
        self.mixed_replays += q == MIXED
        return self.outputs[key][:tokens]
