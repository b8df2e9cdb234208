"""Runs the model for one scheduled step: builds the flat batch, calls the model, samples."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pagedllm.attention.backends.abstract import AttentionBackend, AttentionMetadata
from pagedllm.attention.selector import get_attention_backend
from pagedllm.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.models.loader.model_loader import load_model
from pagedllm.sampling_params import SamplingType
from pagedllm.utils import cdiv, parse_bytes
from pagedllm.worker.block_table import BlockTableRows
from pagedllm.worker.cpu_memory import zeros_untouched
from pagedllm.worker.logits_processors import apply_logits_processors, needs_processing
from pagedllm.worker.logprobs import (
    StepLogprobs,
    gather_logprobs,
    num_logprobs,
    to_scores,
)
from pagedllm.worker.output import ModelRunnerOutput
from pagedllm.worker.sampler import Sampler, SamplingMetadata
from pagedllm.worker.step_inputs import StepInputs

logger = logging.getLogger(__name__)

_PROMPT_LP_SLICE = 1024  # prompt positions whose logits are materialized at once


@dataclass
class PendingStep:
    """A launched step whose sampled ids are on their way to the host."""

    request_ids: list[str]
    host: torch.Tensor | None  # [R] int64 (pinned on CUDA), valid once `done` completed
    done: torch.cuda.Event | None  # None on CPU, where the step ran synchronously


class ModelRunner:
    """Owns the model and the KV cache tensors of one device (one tensor-parallel rank)."""

    def __init__(self, config: EngineConfig, tp: TensorParallelGroup = SINGLE_PROCESS) -> None:
        self.config = config
        self.tp = tp
        self.device = config.device.torch_device
        if self.device.type == "cuda" and tp.world_size > 1:
            # Each rank's process (or Ray actor) selected its GPU before building the runner.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.block_size = config.cache.block_size
        if self.device.type == "cpu" and config.device.cpu_threads:
            torch.set_num_threads(config.device.cpu_threads)
        self.backend: type[AttentionBackend] = get_attention_backend(
            config.device.attention_backend, config.device.device)
        logger.info("Attention backend: %s (%s)", self.backend.name,
                    self.backend.implementation())
        self.model = load_model(config.model, self.backend.get_impl_cls(), self.device, tp)
        self.dtype = config.model.dtype
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self._generators: dict[str, torch.Generator] = {}
        # The last launched step's sampled ids (device) and request id -> row (async).
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        self._block_rows = BlockTableRows()
        self.graphs: Any = None  # DecodeGraphs once captured

    # ------------------------------------------------------------ KV cache
    def kv_heads_per_rank(self) -> int:
        return max(spec.num_kv_heads for spec in self.model.kv_cache_specs())

    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        per_token = [spec.bytes_per_token(elem) for spec in self.model.kv_cache_specs()]
        # FLASH_ATTN without a paged kernel gathers K/V into scratch layers.
        return self.block_size * (sum(per_token)
                                  + self.backend.scratch_layers() * max(per_token))

    def _kv_cache_shape(self, spec: Any, num_blocks: int) -> tuple[int, ...]:
        return self.backend.kv_cache_shape(num_blocks, self.block_size, spec.num_kv_heads,
                                           spec.head_dim)

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit: fixed override, a byte budget, or GPU memory profiling."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if cache.kv_cache_memory_bytes is not None:
            return cache.kv_cache_memory_bytes // self.bytes_per_block()
        if self.device.type == "cpu":
            # What max_num_seqs full-length requests could use, capped at
            # PAGEDLLM_CPU_KVCACHE_SPACE bytes (default DEFAULT_CPU_KV_CACHE_BYTES).
            budget = parse_bytes(os.environ.get("PAGEDLLM_CPU_KVCACHE_SPACE",
                                                str(DEFAULT_CPU_KV_CACHE_BYTES)))
            sched = self.config.scheduler
            useful = sched.max_num_seqs * cdiv(sched.max_model_len, self.block_size)
            return min(budget // self.bytes_per_block(), useful)
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.cache.gpu_memory_utilization - peak - used_by_others
        num_blocks = int(budget // self.bytes_per_block())
        logger.info("Memory profile: peak %.2f GiB of %.2f GiB; KV cache gets %.2f GiB",
                    peak / 2**30, total / 2**30, max(budget, 0) / 2**30)
        return max(num_blocks, 0)

    def profile_run(self) -> None:
        """A forward pass at max_num_batched_tokens, to measure peak activation memory."""
        n = self.config.scheduler.max_num_batched_tokens
        num_reqs = min(self.config.scheduler.max_num_seqs, n)
        per_req = [n // num_reqs + (1 if i < n % num_reqs else 0) for i in range(num_reqs)]
        dummy_blocks = cdiv(max(per_req), self.block_size) * num_reqs
        shapes = [self._kv_cache_shape(spec, dummy_blocks)
                  for spec in self.model.kv_cache_specs()]
        shared = {shape: torch.zeros(shape, dtype=self.dtype, device=self.device)
                  for shape in set(shapes)}  # layers of one shape share a scratch cache
        dummy_cache = [shared[shape] for shape in shapes]
        qsl = np.concatenate([[0], np.cumsum(per_req)]).astype(np.int32)
        blocks_per = cdiv(max(per_req), self.block_size)
        table = np.arange(num_reqs * blocks_per, dtype=np.int32).reshape(num_reqs, blocks_per)
        positions = np.concatenate([np.arange(k) for k in per_req])
        req_idx = np.repeat(np.arange(num_reqs), per_req)
        slots = table[req_idx, positions // self.block_size] * self.block_size + (
            positions % self.block_size)
        md = self._metadata(qsl, np.array(per_req, dtype=np.int32), table, slots, n)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.from_numpy(positions).to(self.device), dummy_cache, md)
            logits = self.model.compute_logits(hidden[qsl[1:] - 1])
            del hidden, logits
        del dummy_cache, shared

    def allocate_kv_cache(self, num_blocks: int) -> None:
        alloc = zeros_untouched if self.device.type == "cpu" else torch.zeros
        self.kv_caches = [alloc(self._kv_cache_shape(spec, num_blocks), dtype=self.dtype,
                                device=self.device)
                          for spec in self.model.kv_cache_specs()]
        self.num_blocks = num_blocks

    # ------------------------------------------------------------ step
    def _metadata(self, qsl: np.ndarray, seq_lens: np.ndarray, table: np.ndarray,
                  slots: np.ndarray, num_tokens: int) -> AttentionMetadata:
        dev = self.device
        qsl_t = torch.from_numpy(qsl)
        seq_t = torch.from_numpy(seq_lens)
        q_lens = np.diff(qsl)
        return AttentionMetadata(
            num_actual_tokens=num_tokens,
            num_reqs=len(seq_lens),
            max_query_len=int(q_lens.max()) if len(q_lens) else 0,
            max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
            query_start_loc=qsl_t.to(dev, non_blocking=True),
            seq_lens=seq_t.to(dev, non_blocking=True),
            block_table=torch.from_numpy(table).to(dev, non_blocking=True),
            slot_mapping=torch.from_numpy(slots.astype(np.int64)).to(dev, non_blocking=True),
            query_start_loc_cpu=qsl_t,
            seq_lens_cpu=seq_t,
            is_decode_only=bool(len(q_lens)) and bool((q_lens == 1).all()),
        )

    def prepare_inputs(self, out: SchedulerOutput,
                       broadcast: Callable[[StepInputs], None] | None = None) -> tuple[
            torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """The step's inputs on the device; with tensor parallelism, `broadcast` first hands
        the host-side arrays to the other ranks (which run them through execute_step)."""
        step = self.prepare_host_inputs(out)
        if broadcast is not None:
            if any(it.request.wants_prompt_logprobs for it in out.scheduled):
                step.prompt_rows = self._prompt_logprob_rows(out, step.query_start_loc)[0]
            broadcast(step)
        return self.device_inputs(step)

    def prepare_host_inputs(self, out: SchedulerOutput) -> StepInputs:
        """The flat batch of a step as numpy arrays (built once, on the driver rank)."""
        items = out.scheduled
        num_reqs = len(items)
        q_lens = np.fromiter((it.num_tokens for it in items), dtype=np.int32, count=num_reqs)
        starts = np.fromiter((it.start for it in items), dtype=np.int32, count=num_reqs)
        qsl = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        num_tokens = int(qsl[-1])
        seq_lens = starts + q_lens
        table = self._block_rows.table([it.request.request_id for it in items],
                                       [it.block_ids for it in items])
        token_ids: list[int] = []
        sample_rows: list[int] = []
        for i, it in enumerate(items):
            toks = it.request.all_token_ids
            end = it.start + it.num_tokens
            if it.num_tokens == 1:
                # A decode (the common case); an async step's pending token is filled on
                # the device (execute_async).
                token_ids.append(toks[it.start] if it.start < len(toks) else 0)
            else:
                ids = toks[it.start:end]
                token_ids.extend(ids)
                if len(ids) < it.num_tokens:
                    token_ids.append(0)
            if end == it.request.num_tokens:
                sample_rows.append(int(qsl[i + 1]) - 1)
        req_idx = np.repeat(np.arange(num_reqs), q_lens)
        positions = np.arange(num_tokens) - np.repeat(qsl[:-1], q_lens) + np.repeat(starts,
                                                                                      q_lens)
        slots = table[req_idx, positions // self.block_size].astype(np.int64) * (
            self.block_size) + positions % self.block_size
        return StepInputs(np.array(token_ids, dtype=np.int64), positions, qsl,
                          seq_lens.astype(np.int32), table, slots, sample_rows)

    def device_inputs(self, step: StepInputs) -> tuple[
            torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """input_ids, positions and attention metadata on the device, and the sampled rows."""
        md = self._metadata(step.query_start_loc, step.seq_lens, step.block_table,
                            step.slot_mapping, step.num_tokens)
        input_ids = torch.from_numpy(step.token_ids).to(self.device, non_blocking=True)
        pos = torch.from_numpy(step.positions).to(self.device, non_blocking=True)
        return input_ids, pos, md, step.sample_rows

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  md: AttentionMetadata) -> torch.Tensor:
        """Hidden states of every token: a captured CUDA graph for decode batches, else eager."""
        graph = self.graphs.lookup(md) if self.graphs is not None else None
        if graph is not None:
            return self.graphs.replay(graph, input_ids, positions, md)
        return self.model(input_ids, positions, self.kv_caches, md)

    @torch.inference_mode()
    def execute_step(self, step: StepInputs) -> None:
        """A tensor-parallel worker rank's part of a step the driver broadcast: the forward
        pass and the LM head. The vocab-parallel LM head all-gathers, so every rank must
        compute logits over the same rows in the same order as the driver's `execute`:
        prompt-logprob rows in slices, then sample_rows (once). After an async step the
        driver's sampled ids arrive by broadcast, for the next step's pending tokens."""
        input_ids, positions, md, sample_rows = self.device_inputs(step)
        self._fill_pending(input_ids, step.pending_dst, step.pending_src)
        hidden = self.run_model(input_ids, positions, md)
        for s in range(0, len(step.prompt_rows), _PROMPT_LP_SLICE):
            self.model.compute_logits(hidden[step.prompt_rows[s:s + _PROMPT_LP_SLICE]])
        if sample_rows:
            self.model.compute_logits(hidden[sample_rows])
        if step.shares_sampled:
            sampled = torch.empty(len(sample_rows), dtype=torch.long, device=self.device)
            self._last_sampled = self.tp.broadcast(sampled)

    def _sampling_metadata(self, requests: list[Any]) -> SamplingMetadata:
        params = [r.sampling_params for r in requests]
        all_greedy = all(p.sampling_type == SamplingType.GREEDY for p in params)

        def to_device(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            # Asynchronous copy: a blocking one would wait for the GPU's queued work.
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        temperature = to_device([p.temperature for p in params], torch.float32)
        vocab = self.config.model.vocab_size
        top_k = top_p = min_p = None
        if any(p.top_k > 0 for p in params):
            top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], torch.long)
        if any(p.top_p < 1.0 for p in params):
            top_p = to_device([p.top_p for p in params], torch.float32)
        if any(p.min_p > 0.0 for p in params):
            min_p = to_device([p.min_p for p in params], torch.float32)
        dev = self.device
        generators = {}
        for row, req in enumerate(requests):
            seed = req.sampling_params.seed
            if seed is not None and req.sampling_params.sampling_type != SamplingType.GREEDY:
                gen = self._generators.get(req.request_id)
                if gen is None:
                    gen = torch.Generator(device=dev).manual_seed(seed)
                    self._generators[req.request_id] = gen
                generators[row] = gen
        return SamplingMetadata(temperature, top_k, top_p, min_p, all_greedy, generators)

    def _forget(self, finished_ids: list[str]) -> None:
        """Drop the per-request state (seeded generators, block-table rows) of finished
        requests."""
        for rid in finished_ids:
            self._generators.pop(rid, None)
        self._block_rows.forget(finished_ids)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                broadcast: Callable[[StepInputs], None] | None = None) -> ModelRunnerOutput:
        """Run one step; returns the sampled token of every request that samples (and the
        logprobs of those that ask for them).

        With tensor parallelism this is the driver rank: `broadcast` sends the step's inputs
        to the other ranks; sampling happens here only.
        """
        self._forget(out.finished_ids)
        if out.block_copies:
            self.copy_blocks(out.block_copies)
        if out.is_empty:
            return ModelRunnerOutput({})
        input_ids, positions, md, sample_rows = self.prepare_inputs(out, broadcast)
        hidden = self.run_model(input_ids, positions, md)
        if any(it.request.sampling_extras for it in out.scheduled):
            return self._execute_extras(out, hidden, md, sample_rows)
        if not sample_rows:
            return ModelRunnerOutput({})
        sampling_reqs = [it.request for it in out.scheduled if it.samples]
        logits = self.model.compute_logits(hidden[sample_rows])
        if any(needs_processing(r) for r in sampling_reqs):
            logits = apply_logits_processors(logits.float(), sampling_reqs)
        sampled = self.sampler.sample(logits, self._sampling_metadata(sampling_reqs))
        ids = sampled.tolist()
        return ModelRunnerOutput({req.request_id: tok for req, tok in zip(sampling_reqs, ids)})

    @torch.inference_mode()
    def execute_async(self, out: SchedulerOutput,
                      broadcast: Callable[[StepInputs], None] | None = None) -> PendingStep:
        """Launch one plain step (no logprobs, logits processors or forks) without waiting
        for it: the sampled ids start their copy to the host and `fetch` collects them.

        A request's last input token may still be pending from the previous launched step;
        it is taken from that step's sampled ids on the device. With tensor parallelism,
        `broadcast` sends the step to the other ranks, and the sampled ids follow them over
        NCCL, so no rank waits for the host.
        """
        self._forget(out.finished_ids)
        step = self.prepare_host_inputs(out)
        for i, it in enumerate(out.scheduled):
            known = len(it.request.all_token_ids)
            if it.start + it.num_tokens > known:
                step.pending_dst.append(int(step.query_start_loc[i]) + known - it.start)
                step.pending_src.append(self._last_rows[it.request.request_id])
        reqs = [it.request for it in out.scheduled if it.samples]
        step.shares_sampled = bool(reqs) and self.tp.world_size > 1
        if broadcast is not None:
            broadcast(step)
        input_ids, positions, md, sample_rows = self.device_inputs(step)
        self._fill_pending(input_ids, step.pending_dst, step.pending_src)
        hidden = self.run_model(input_ids, positions, md)
        if not reqs:
            self._last_rows = {}
            return PendingStep([], None, None)
        rows = torch.tensor(sample_rows).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        sampled = self.sampler.sample(logits, self._sampling_metadata(reqs))
        if step.shares_sampled:
            sampled = self.tp.broadcast(sampled.contiguous())
        self._last_sampled = sampled
        self._last_rows = {r.request_id: i for i, r in enumerate(reqs)}
        host, done = sampled, None
        if sampled.is_cuda:
            host = torch.empty(len(reqs), dtype=torch.long, pin_memory=True)
            host.copy_(sampled, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return PendingStep([r.request_id for r in reqs], host, done)

    def _fill_pending(self, input_ids: torch.Tensor, dst: list[int], src: list[int]) -> None:
        """Write the previous step's sampled ids (still on the device) into input rows."""
        if dst:
            index = torch.tensor([dst, src]).to(self.device, non_blocking=True)
            input_ids[index[0]] = self._last_sampled[index[1]]

    @staticmethod
    def fetch(pending: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step's sampled ids."""
        if pending.host is None:
            return ModelRunnerOutput({})
        if pending.done is not None:
            pending.done.synchronize()
        return ModelRunnerOutput(dict(zip(pending.request_ids, pending.host.tolist())))

    def _execute_extras(self, out: SchedulerOutput, hidden: torch.Tensor,
                        md: AttentionMetadata, sample_rows: list[int]) -> ModelRunnerOutput:
        """The sampling path of steps with logprobs, prompt logprobs or n > 1 forks: the
        fork rows repeat their parent's logits; all logprobs are gathered batched and come
        to the host with the sampled ids in one copy."""
        step = StepLogprobs()
        self._prompt_logprobs(out, hidden, md, step)
        if not sample_rows:
            return ModelRunnerOutput({}, prompt_logprobs=step.fetch(None)[2])
        reqs = [it.request for it in out.scheduled if it.samples]
        logits = self.model.compute_logits(hidden[sample_rows]).float()
        mode = self.config.model.logprobs_mode
        wants_lp = any(r.wants_logprobs for r in reqs)
        raw = logits.clone() if wants_lp and mode.startswith("raw") else None
        if any(needs_processing(r) for r in reqs):
            logits = apply_logits_processors(logits, reqs)
        if any(r.pending_forks for r in reqs):
            reqs, rows = expand_forks(reqs)
            index = torch.tensor(rows, device=logits.device)
            logits = logits[index]
            raw = raw[index] if raw is not None else None
        sampled, processed = self.sampler(logits, self._sampling_metadata(reqs))
        lp_rows = [i for i, r in enumerate(reqs) if r.wants_logprobs]
        if lp_rows:
            index = torch.tensor(lp_rows, device=logits.device)
            scores = to_scores((raw if raw is not None else processed)[index], mode)
            vocab = scores.shape[1]
            step.add(scores, sampled[index],
                     [(reqs[i].request_id, 1, num_logprobs(reqs[i].sampling_params.logprobs,
                                                           vocab), 0) for i in lp_rows],
                     prompt=False)
        ids, sample_lp, prompt_lp = step.fetch(sampled)
        return ModelRunnerOutput({r.request_id: t for r, t in zip(reqs, ids)},
                                 sample_lp, prompt_lp)

    def _prompt_logprob_rows(self, out: SchedulerOutput, query_start_loc: Any) -> tuple[
            list[int], list[int], list[tuple[str, int, int, int]]]:
        """Rows of this step's hidden states that score prompt tokens, those tokens, and per
        request (id, number of rows, top-k, prompt position of its first row)."""
        qsl = query_start_loc.tolist()
        rows: list[int] = []
        targets: list[int] = []
        entries = []
        vocab = self.config.model.vocab_size
        for i, it in enumerate(out.scheduled):
            req = it.request
            if not req.wants_prompt_logprobs:
                continue
            end = min(it.start + it.num_tokens, req.num_prompt_tokens - 1)
            if end <= it.start:
                continue
            rows.extend(range(qsl[i], qsl[i] + end - it.start))
            targets.extend(req.prompt_token_ids[it.start + 1:end + 1])
            k = num_logprobs(req.sampling_params.prompt_logprobs, vocab)
            entries.append((req.request_id, end - it.start, k, it.start + 1))
        return rows, targets, entries

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor,
                         md: AttentionMetadata, step: StepLogprobs) -> None:
        """Queue the logprobs of the prompt tokens this step's chunks predict: the row of
        prompt position p scores token p + 1 (the first prompt token has none)."""
        rows, targets, entries = self._prompt_logprob_rows(out, md.query_start_loc_cpu)
        if not rows:
            return
        mode = self.config.model.logprobs_mode
        row_t = torch.tensor(rows, device=hidden.device)
        target_t = torch.tensor(targets, device=hidden.device)
        k = max(e[2] for e in entries)
        packed = [  # in slices, so that [rows, vocab] logits stay small
            gather_logprobs(
                to_scores(self.model.compute_logits(hidden[row_t[s:s + _PROMPT_LP_SLICE]]), mode),
                target_t[s:s + _PROMPT_LP_SLICE], k)
            for s in range(0, len(rows), _PROMPT_LP_SLICE)]
        step.add_packed(torch.cat(packed), entries, prompt=True)

    @torch.inference_mode()
    def _warm_up_sampler(self) -> None:
        """One greedy and one temperature row through the fast sampler."""
        vocab = self.config.model.vocab_size
        logits = torch.zeros(2, vocab, dtype=self.dtype, device=self.device)
        temperature = torch.tensor([0.0, 1.0], device=self.device)
        self.sampler.sample(logits, SamplingMetadata(temperature, None, None, None, False, {}))
        torch.cuda.synchronize(self.device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV blocks src -> dst in every layer (copy-on-write for forked samples)."""
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        self.backend.copy_blocks(self.kv_caches, src, dst)

    def warm_up(self) -> None:
        """On CUDA: compile the sampling kernel and capture CUDA graphs for decode batches
        (unless enforce_eager), so that no compilation happens while serving."""
        if self.device.type != "cuda":
            return
        if self.tp.rank == 0:  # only rank 0 samples
            self._warm_up_sampler()
        if self.config.device.enforce_eager or not self.backend.supports_cuda_graphs():
            return
        if self.tp.world_size > 1 and self.tp.communicator is None:
            return  # torch.distributed's collectives are not captured (no libnccl: warned)
        from pagedllm.worker.cuda_graphs import DecodeGraphs

        start = time.perf_counter()
        sched = self.config.scheduler
        self.graphs = DecodeGraphs(
            self.model, self.kv_caches, self.device,
            max_batch_size=min(sched.max_num_seqs, 512),
            max_blocks_per_seq=cdiv(sched.max_model_len, self.block_size))
        self.graphs.capture()
        logger.info("Captured CUDA graphs for %d decode batch sizes (up to %d) in %.1f s",
                    len(self.graphs.sizes), self.graphs.sizes[-1], time.perf_counter() - start)


def expand_forks(reqs: list[Any]) -> tuple[list[Any], list[int]]:
    """Rows to sample: each request, followed by the children to fork off it, which sample
    their first token from the same logits row. Returns (requests, source row of each)."""
    out_reqs, rows = [], []
    for i, req in enumerate(reqs):
        out_reqs.append(req)
        rows.append(i)
        for child in req.pending_forks:
            out_reqs.append(child)
            rows.append(i)
    return out_reqs, rows
