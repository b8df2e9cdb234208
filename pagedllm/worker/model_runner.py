"""Runs the model for one scheduled step: builds the flat batch, calls the model, samples."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pagedllm.attention.backends.abstract import AttentionBackend, AttentionMetadata
from pagedllm.attention.selector import get_attention_backend
from pagedllm.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.models.loader.model_loader import load_model
from pagedllm.quantization.kv_cache import check_kv_cache_scales, kv_cache_torch_dtype
from pagedllm.sampling_params import SamplingParams, SamplingType
from pagedllm.spec_decode.positions import position_states
from pagedllm.spec_decode.rejection_sampler import rejection_sample
from pagedllm.utils import cdiv, parse_bytes, to_device_async
from pagedllm.worker.batch_state import BatchState, RequestState, seeded
from pagedllm.worker.cpu_memory import zeros_untouched
from pagedllm.worker.cpu_threads import ThreadTuner
from pagedllm.worker.logits_processors import apply_logits_processors, needs_processing
from pagedllm.worker.logprobs import (
    StepLogprobs,
    gather_logprobs,
    num_logprobs,
    to_scores,
)
from pagedllm.worker.output import GrammarOutput, ModelRunnerOutput
from pagedllm.worker.sampler import Sampler, SamplingMetadata
from pagedllm.worker.step_inputs import StepInputs

logger = logging.getLogger(__name__)

_PROMPT_LP_SLICE = 1024  # prompt positions whose logits are materialized at once


@dataclass
class PendingStep:
    """A launched step whose results are on their way to the host (`ModelRunner.fetch`)."""

    request_ids: list[str]  # the sampled rows' request ids
    host: torch.Tensor | None  # sampled ids and logprobs (pinned on CUDA), once `done`
    done: torch.cuda.Event | None  # None on CPU, where the step ran synchronously
    logprobs: StepLogprobs = field(default_factory=StepLogprobs)
    # Speculative decoding: each request's tokens, already on the host (the rejection
    # sampler's accepted counts decide them), and the draft model's next proposals.
    tokens: list[list[int]] | None = None
    proposals: dict[str, list[int]] = field(default_factory=dict)


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
        self.thread_tuner = (ThreadTuner(config.device.cpu_threads)
                             if self.device.type == "cpu" and config.device.cpu_threads_adaptive
                             else None)
        self.backend: type[AttentionBackend] = get_attention_backend(
            config.device.attention_backend, config.device.device)
        logger.info("Attention backend: %s (%s)", self.backend.name,
                    self.backend.implementation())
        self.model = load_model(config.model, self.backend.get_impl_cls(), self.device, tp)
        self.dtype = config.model.dtype
        self.kv_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, self.dtype)
        check_kv_cache_scales(self.model, config.cache.kv_cache_dtype)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        # Seeded generators by request id: kept across preemption, dropped when finished.
        self._generators: dict[str, torch.Generator] = {}
        self.batch = BatchState(config.model.vocab_size, config.scheduler.max_num_seqs)
        # The last launched step's sampled ids (device) and request id -> row (async).
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        self.graphs: Any = None  # StepGraphs once captured
        # Speculative decoding: verification in `execute`; a draft model proposes there.
        self.speculative = config.speculative
        self.drafter: Any = None
        if config.draft_model is not None:
            from pagedllm.spec_decode.draft_model import DraftModel

            self.drafter = DraftModel(config, self.backend, self.device)

    # ------------------------------------------------------------ KV cache
    def kv_heads_per_rank(self) -> int:
        return max(spec.num_kv_heads for spec in self.model.kv_cache_specs())

    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        per_token = [spec.bytes_per_token(elem) for spec in self.model.kv_cache_specs()]
        if self.drafter is not None:  # the draft's cache has a slot for every block id too
            draft_elem = torch.tensor([], dtype=self.drafter.kv_dtype).element_size()
            per_token += [spec.bytes_per_token(draft_elem)
                          for spec in self.drafter.model.kv_cache_specs()]
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
        shared = {shape: torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
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
        self.kv_caches = [alloc(self._kv_cache_shape(spec, num_blocks), dtype=self.kv_dtype,
                                device=self.device)
                          for spec in self.model.kv_cache_specs()]
        self.num_blocks = num_blocks
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num_blocks, alloc, self._kv_cache_shape)

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
            query_start_loc=to_device_async(qsl_t, dev),
            seq_lens=to_device_async(seq_t, dev),
            block_table=to_device_async(table, dev),
            slot_mapping=to_device_async(slots.astype(np.int64), dev),
            query_start_loc_cpu=qsl_t,
            seq_lens_cpu=seq_t,
            is_decode_only=bool(len(q_lens)) and bool((q_lens == 1).all()),
        )

    def _update_states(self, out: SchedulerOutput) -> None:
        """Requests leave (finished, preempted) and join (in full); the others add blocks."""
        for rid in out.finished_ids:
            self._generators.pop(rid, None)
        self.batch.remove(out.finished_ids)
        self.batch.remove(out.preempted)
        if self.drafter is not None:
            self.drafter.forget(out.finished_ids)
            self.drafter.forget(out.preempted)
        for data in out.new_requests:
            self.batch.add(data)
        requests = self.batch.requests
        for diff in out.cached_requests:
            if diff.num_kept_blocks >= 0:
                requests[diff.request_id].num_blocks = diff.num_kept_blocks
            if diff.new_block_ids:
                requests[diff.request_id].add_blocks(diff.new_block_ids)

    def prepare_host_inputs(self, out: SchedulerOutput) -> StepInputs:
        """The flat batch of a step as numpy arrays (built once, on the driver rank). A token
        sampled by the step still in flight is taken from its sampled ids on the device
        (`pending_dst` / `pending_src`)."""
        states = [self.batch.requests[rid] for rid in out.req_ids]
        num_reqs = len(states)
        q_lens = np.array(out.num_scheduled_tokens, dtype=np.int32)
        starts = np.array(out.num_computed_tokens, dtype=np.int32)
        qsl = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        num_tokens = int(qsl[-1])
        seq_lens = starts + q_lens
        rows = [st.block_row for st in states]
        table = np.zeros((num_reqs, max((len(r) for r in rows), default=0)), dtype=np.int32)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
        token_ids: list[int] = []
        sample_rows: list[int] = []
        pending_dst: list[int] = []
        pending_src: list[int] = []
        all_drafts = out.scheduled_draft_tokens
        for i, st in enumerate(states):
            toks = st.all_token_ids
            start = int(starts[i])
            n = int(q_lens[i])
            known = len(toks)
            drafts = all_drafts.get(st.request_id) if all_drafts else None
            if n == 1:  # a decode (the common case)
                token_ids.append(toks[start] if start < known else 0)
            elif drafts:  # its last token, then the drafts to verify (one row each)
                token_ids.append(toks[start])
                token_ids.extend(drafts)
                sample_rows.extend(range(int(qsl[i]), int(qsl[i + 1])))
                continue
            else:
                ids = toks[start:start + n]
                token_ids.extend(ids)
                token_ids.extend([0] * (n - len(ids)))
            if start + n > known:  # its last input token is still on the device
                pending_dst.append(int(qsl[i]) + known - start)
                pending_src.append(self._last_rows[st.request_id])
            if out.samples[i]:
                sample_rows.append(int(qsl[i + 1]) - 1)
        req_idx = np.repeat(np.arange(num_reqs), q_lens)
        positions = np.arange(num_tokens) - np.repeat(qsl[:-1], q_lens) + np.repeat(starts,
                                                                                      q_lens)
        slots = table[req_idx, positions // self.block_size].astype(np.int64) * (
            self.block_size) + positions % self.block_size
        step = StepInputs(np.array(token_ids, dtype=np.int64), positions, qsl,
                          seq_lens.astype(np.int32), table, slots, sample_rows,
                          pending_dst=pending_dst, pending_src=pending_src)
        step.num_sampled = len(sample_rows) + sum(len(c) for c in out.forks.values())
        step.shares_sampled = (self.tp.world_size > 1 and step.num_sampled > 0
                               and self.config.scheduler.async_scheduling)
        return step

    def device_inputs(self, step: StepInputs) -> tuple[
            torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """input_ids, positions and attention metadata on the device, and the sampled rows."""
        md = self._metadata(step.query_start_loc, step.seq_lens, step.block_table,
                            step.slot_mapping, step.num_tokens)
        input_ids = to_device_async(step.token_ids, self.device)
        pos = to_device_async(step.positions, self.device)
        return input_ids, pos, md, step.sample_rows

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  md: AttentionMetadata) -> torch.Tensor:
        """Hidden states of every token: a captured CUDA graph for decode (and verify)
        batches, else eager."""
        if self.graphs is not None:
            return self.graphs.run(input_ids, positions, md)
        if self.thread_tuner is not None:
            with self.thread_tuner.step(input_ids.shape[0]):
                return self.model(input_ids, positions, self.kv_caches, md)
        return self.model(input_ids, positions, self.kv_caches, md)

    @torch.inference_mode()
    def execute_step(self, step: StepInputs) -> None:
        """A tensor-parallel worker rank's part of a step the driver broadcast: the forward
        pass and the LM head. The vocab-parallel LM head all-gathers, so every rank must
        compute logits over the same rows in the same order as the driver's `execute`:
        prompt-logprob rows in slices, then sample_rows (once). With async scheduling the
        driver's sampled ids arrive by broadcast, for the next step's pending tokens."""
        input_ids, positions, md, sample_rows = self.device_inputs(step)
        self._fill_pending(input_ids, step.pending_dst, step.pending_src)
        hidden = self.run_model(input_ids, positions, md)
        for s in range(0, len(step.prompt_rows), _PROMPT_LP_SLICE):
            self.model.compute_logits(hidden[step.prompt_rows[s:s + _PROMPT_LP_SLICE]])
        if sample_rows:
            self.model.compute_logits(hidden[sample_rows])
        if step.shares_sampled:
            sampled = torch.empty(step.num_sampled, dtype=torch.long, device=self.device)
            self._last_sampled = self.tp.broadcast(sampled)

    def _sampling_metadata(self, rows: list[RequestState | None],
                           params: list[SamplingParams], ids: list[str]) -> SamplingMetadata:
        """Sampling tensors of the rows (a None state: a forked sample, by its params)."""
        slots = np.fromiter((st.slot if st is not None else -1 for st in rows),
                            dtype=np.int64, count=len(rows))
        generators = {}
        for row, (p, rid) in enumerate(zip(params, ids)):
            if p.seed is not None and seeded(p):  # most requests are unseeded
                gen = self._generators.get(rid)
                if gen is None:
                    gen = torch.Generator(device=self.device).manual_seed(p.seed)
                    self._generators[rid] = gen
                generators[row] = gen
        return self.batch.sampling_metadata(slots, params, generators, self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                before_sample: Callable[[], GrammarOutput | None] | None = None,
                broadcast: Callable[[StepInputs], None] | None = None) -> PendingStep:
        """Run one step: prepare inputs -> forward -> logits pipeline (penalties, logit bias,
        bad words, allowed ids, grammar bitmask) -> sampler -> async copy of the results to
        the host. Returns without waiting for the device; `fetch` collects the results.

        `before_sample` runs once the forward is launched and before the logits pipeline
        (the engine collects the previous step there when this one's logits need its tokens,
        and fills the grammar bitmask). With tensor parallelism this is the driver rank:
        `broadcast` sends the step's inputs to the other ranks; sampling happens here only.
        """
        self._update_states(out)
        if out.block_copies:
            self.copy_blocks(out.block_copies)
        if out.is_empty:
            if before_sample is not None:
                before_sample()
            return PendingStep([], None, None)
        step = self.prepare_host_inputs(out)
        if broadcast is not None:
            if any(self.batch.requests[rid].wants_prompt_logprobs for rid in out.req_ids):
                step.prompt_rows = self._prompt_logprob_rows(out, step.query_start_loc)[0]
            broadcast(step)
        input_ids, positions, md, sample_rows = self.device_inputs(step)
        self._fill_pending(input_ids, step.pending_dst, step.pending_src)
        hidden = self.run_model(input_ids, positions, md)
        if self.drafter is not None:  # the draft computes the same tokens into its cache
            self.drafter.forward(input_ids, positions, self._metadata(
                step.query_start_loc, step.seq_lens, step.block_table, step.slot_mapping,
                step.num_tokens))
        lp = StepLogprobs()
        self._prompt_logprobs(out, hidden, md, lp)
        logits = None
        if sample_rows:
            rows = to_device_async(torch.tensor(sample_rows), self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        grammar = before_sample() if before_sample is not None else None
        if logits is None:
            self._last_rows = {}
            return self._start_copy([], None, lp)
        if self.speculative is not None:
            return self._verify(out, step, logits, grammar, lp)
        ids = out.sampling_ids
        states: list[RequestState | None] = [self.batch.requests[rid] for rid in ids]
        logits, raw = self._logits_pipeline(logits, states, grammar, out.needs_host_tokens)
        params = [st.sampling_params for st in states]  # type: ignore[union-attr]
        if out.forks:
            ids, states, params, index = _expand_forks(ids, states, params, out.forks)
            logits = logits[index]
            raw = raw[index] if raw is not None else None
        md_s = self._sampling_metadata(states, params, ids)
        lp_rows = [i for i, p in enumerate(params) if p.wants_logprobs]
        if lp_rows:
            sampled, processed = self.sampler(logits, md_s)
            index = torch.tensor(lp_rows, device=logits.device)
            self._sample_logprobs(lp, raw, processed, index, sampled[index],
                                  [(ids[i], 1, params[i]) for i in lp_rows])
        else:
            sampled = self.sampler.sample(logits, md_s)
        if step.shares_sampled:
            sampled = self.tp.broadcast(sampled.contiguous())
        self._last_sampled = sampled
        self._last_rows = {rid: i for i, rid in enumerate(ids)}
        return self._start_copy(ids, sampled, lp)

    def _verify(self, out: SchedulerOutput, step: StepInputs, logits: torch.Tensor,
                grammar: GrammarOutput | None, lp: StepLogprobs) -> PendingStep:
        """Speculative decoding's sampling: every verified position's logits go through the
        logits pipeline (each seeing the drafts before it) and the sampler's processing, then
        the rejection sampler keeps each request's accepted drafts and draws one more token
        (rows without drafts just sample). Logprobs are gathered for the tokens kept. A draft
        model then proposes the next drafts."""
        ids = out.sampling_ids
        states: list[Any] = [self.batch.requests[rid] for rid in ids]
        drafts = [out.scheduled_draft_tokens.get(rid, []) for rid in ids]
        row_states = [s for st, d in zip(states, drafts)
                      for s in position_states(st, d, needs_processing(st))]
        logits, raw = self._logits_pipeline(logits, row_states, grammar, out.needs_host_tokens)
        params = [st.sampling_params for st in states]
        batch_rows = (ids, states, drafts)  # the batch's sampled requests, forks aside
        if out.forks:  # forked samples draw from their parent's (only) row
            first_row = first_row_of([1 + len(d) for d in drafts])
            ids, states, params, owner = _expand_forks(ids, states, params, out.forks)
            drafts = [drafts[o] if st is not None else [] for o, st in zip(owner, states)]
            index = np.concatenate([np.arange(first_row[o], first_row[o] + 1 + len(d))
                                    for o, d in zip(owner, drafts)])
            index_t = torch.from_numpy(index).to(self.device)
            logits = logits[index_t]
            raw = raw[index_t] if raw is not None else None
        num_rows = [1 + len(d) for d in drafts]
        md_req = self._sampling_metadata(states, params, ids)
        row_of = np.repeat(np.arange(len(ids)), num_rows)
        slots = np.fromiter((states[r].slot if states[r] is not None else -1 for r in row_of),
                            dtype=np.int64, count=len(row_of))
        md_rows = self.batch.sampling_metadata(slots, [params[r] for r in row_of], {},
                                               self.device)
        greedy_ids, processed = self.sampler.process(logits, md_rows)
        probs = processed if md_rows.all_greedy else processed.softmax(dim=-1)
        flat_drafts = [t for d in drafts for t in d]
        draft_ids = torch.tensor(flat_drafts, dtype=torch.long).to(self.device)
        draft_probs = (self.drafter.draft_probs(ids, drafts, probs.shape[1])
                       if self.drafter is not None else None)
        greedy = torch.tensor([p.sampling_type == SamplingType.GREEDY for p in params]
                              ).to(self.device)
        tokens = rejection_sample(probs, greedy_ids, draft_ids, [len(d) for d in drafts],
                                  draft_probs, greedy, md_req.generators)
        lp_reqs = [i for i, p in enumerate(params) if p.wants_logprobs]
        if lp_reqs:
            starts = first_row_of(num_rows)
            rows = [int(starts[i]) + j for i in lp_reqs for j in range(len(tokens[i]))]
            kept = torch.tensor([t for i in lp_reqs for t in tokens[i]], device=self.device)
            self._sample_logprobs(lp, raw, processed, torch.tensor(rows, device=self.device),
                                  kept, [(ids[i], len(tokens[i]), params[i]) for i in lp_reqs])
        proposals: dict[str, list[int]] = {}
        if self.drafter is not None:
            batch_tokens = [t for t, st in zip(tokens, states) if st is not None]
            proposals = self.drafter.propose(self, out, step, batch_rows, batch_tokens)
        self._last_rows = {}
        pending = self._start_copy(ids, None, lp)
        pending.tokens = tokens
        pending.proposals = proposals
        return pending

    def _sample_logprobs(self, lp: StepLogprobs, raw: torch.Tensor | None,
                         processed: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                         requests: list[tuple[str, int, SamplingParams]]) -> None:
        """Logprobs of the sampled `tokens`, one per logits row of `rows`, from the raw or
        the processed scores as logprobs_mode asks; `requests` (id, tokens, params) own the
        rows back to back."""
        scores = to_scores((raw if raw is not None else processed)[rows],
                           self.config.model.logprobs_mode)
        vocab = scores.shape[1]
        lp.add(scores, tokens, [(rid, n, num_logprobs(p.logprobs, vocab), 0)
                                for rid, n, p in requests], prompt=False)

    def _logits_pipeline(self, logits: torch.Tensor, states: list[Any],
                         grammar: GrammarOutput | None, maybe_processing: bool) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        """Per-request adjustments of the sampled rows' logits, before temperature: the
        logits processors (penalties, logit bias, allowed ids, bad words, min_tokens), then
        the grammar bitmask. Returns the logits and, for raw logprobs, a copy taken first.
        `maybe_processing` False (the scheduler found no request needing processors: its
        `needs_host_tokens`) skips the per-request check."""
        raw = None
        wants_lp = any(st.wants_logprobs for st in states)
        if wants_lp and self.config.model.logprobs_mode.startswith("raw"):
            logits = logits.float()
            raw = logits.clone()
        processing = maybe_processing and any(needs_processing(st) for st in states)
        if processing or wants_lp or (grammar is not None and grammar.rows):
            logits = logits.float()
        if processing:
            logits = apply_logits_processors(logits, states)
        if grammar is not None and grammar.rows:
            grammar.bitmask.apply(logits, grammar.rows)
        return logits, raw

    def _start_copy(self, ids: list[str], sampled: torch.Tensor | None,
                    lp: StepLogprobs) -> PendingStep:
        """Start the one device-to-host copy of the step's sampled ids and logprobs."""
        flat = lp.pack(sampled)
        if flat is None:
            return PendingStep(ids, None, None, lp)
        host, done = flat, None
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return PendingStep(ids, host, done, lp)

    def _fill_pending(self, input_ids: torch.Tensor, dst: list[int], src: list[int]) -> None:
        """Write the previous step's sampled ids (still on the device) into input rows."""
        if dst:
            index = to_device_async(torch.tensor([dst, src]), self.device)
            input_ids[index[0]] = self._last_sampled[index[1]]

    def fetch(self, pending: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step's results; the sampled tokens join the runner's own copy
        of each request's tokens."""
        if pending.host is None and pending.tokens is None:
            return ModelRunnerOutput({})
        if pending.done is not None:
            pending.done.synchronize()
        lists = pending.tokens
        ids: list[int] = []
        sample_lp: dict = {}
        prompt_lp: dict = {}
        if pending.host is not None:
            num = len(pending.request_ids) if lists is None else 0
            ids, sample_lp, prompt_lp = pending.logprobs.unpack(pending.host.numpy(), num)
        if lists is None:
            lists = [[token] for token in ids]
        sampled: dict[str, list[int]] = {}
        requests = self.batch.requests
        for rid, tokens in zip(pending.request_ids, lists):
            sampled[rid] = tokens
            state = requests.get(rid)
            if state is not None:
                state.all_token_ids.extend(tokens)
        return ModelRunnerOutput(sampled, sample_lp, prompt_lp, pending.proposals)

    def _prompt_logprob_rows(self, out: SchedulerOutput, query_start_loc: Any) -> tuple[
            list[int], list[int], list[tuple[str, int, int, int]]]:
        """Rows of this step's hidden states that score prompt tokens, those tokens, and per
        request (id, number of rows, top-k, prompt position of its first row)."""
        qsl = query_start_loc.tolist()
        rows: list[int] = []
        targets: list[int] = []
        entries = []
        vocab = self.config.model.vocab_size
        for i, rid in enumerate(out.req_ids):
            st = self.batch.requests[rid]
            if not st.wants_prompt_logprobs:
                continue
            start = out.num_computed_tokens[i]
            end = min(start + out.num_scheduled_tokens[i], st.num_prompt_tokens - 1)
            if end <= start:
                continue
            rows.extend(range(qsl[i], qsl[i] + end - start))
            targets.extend(st.all_token_ids[start + 1:end + 1])
            k = num_logprobs(st.sampling_params.prompt_logprobs, vocab)
            entries.append((rid, end - start, k, start + 1))
        return rows, targets, entries

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor,
                         md: AttentionMetadata, step: StepLogprobs) -> None:
        """Queue the logprobs of the prompt tokens this step's chunks predict: the row of
        prompt position p scores token p + 1 (the first prompt token has none)."""
        if not any(self.batch.requests[rid].wants_prompt_logprobs for rid in out.req_ids):
            return
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
    def _warm_up_step_tail(self) -> None:
        """Run a step's tail (its sampled rows gathered, the LM head, the sampler) once at
        every row count a step samples, 1 to max_num_seqs.

        On CUDA a kernel's module loads at its first launch, and that load waits for the
        device to drain. cuBLAS picks the LM head's GEMM kernel by row count, and the fused
        sampler its vocabulary split. So the first step with a new count would hold the
        host until the device had finished that step's forward, and the device would then
        idle while the host scheduled. An H200 showed 170-400 ms waits in most prefill steps
        of a 1,000-request run. The torch sampler (top-k / top-p / min-p rows) runs at a
        few counts only: sorting the vocabulary at every count would take seconds, and at
        max_num_seqs rows its buffers would take memory the KV cache was given. Every
        tensor-parallel rank runs the LM head (it all-gathers); rank 0 samples."""
        rows = self.config.scheduler.max_num_seqs
        hidden = torch.zeros(rows, self.config.model.hf_config.hidden_size, dtype=self.dtype,
                             device=self.device)
        index = torch.arange(rows, device=self.device)
        temperature = (torch.arange(rows, device=self.device) % 2).float()  # greedy, T = 1
        general = {1, 2, 3, 8, 64, 257}  # the torch sampler's few counts
        for n in range(1, rows + 1):
            logits = self.model.compute_logits(hidden.index_select(0, index[:n]))
            if self.tp.rank != 0:
                continue
            self.sampler.sample(logits, SamplingMetadata(temperature[:n], None, None, None,
                                                         False, {}))
            if n in general:
                top_k = torch.full((n,), 5, dtype=torch.long, device=self.device)
                top_p = torch.full((n,), 0.9, device=self.device)
                min_p = torch.full((n,), 0.05, device=self.device)
                self.sampler(logits, SamplingMetadata(temperature[:n], top_k, top_p, min_p,
                                                      False, {}))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV blocks src -> dst in every layer (copy-on-write for forked samples)."""
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        self.backend.copy_blocks(self.kv_caches, src, dst)
        if self.drafter is not None:
            self.backend.copy_blocks(self.drafter.kv_caches, src, dst)

    def warm_up(self) -> None:
        """On CUDA: load the step tail's kernels at every row count, and capture CUDA graphs
        for decode batches and, when speculating, verify batches (unless enforce_eager), for
        the target and the draft model, so that no compilation or module load happens while
        serving."""
        if self.device.type != "cuda":
            return
        self._warm_up_step_tail()
        if self.config.device.enforce_eager or not self.backend.supports_cuda_graphs():
            return
        if self.tp.world_size > 1 and self.tp.communicator is None:
            return  # torch.distributed's collectives are not captured (no libnccl: warned)
        verify: tuple[int, ...] = ()
        mixed = self.backend.supports_mixed_cuda_graphs()
        if self.speculative is not None and mixed:
            verify = tuple(range(2, self.speculative.num_speculative_tokens + 2))
        self.graphs = self._capture_graphs(self.model, self.kv_caches, verify, mixed, "")
        if self.drafter is not None:
            self.drafter.graphs = self._capture_graphs(
                self.drafter.model, self.drafter.kv_caches, verify, mixed, " (draft model)")

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs (the target's and the draft's) at shutdown."""
        for owner in (self, self.drafter):
            if owner is not None and owner.graphs is not None:
                owner.graphs.release()
                owner.graphs = None

    def _capture_graphs(self, model: Any, kv_caches: list[torch.Tensor],
                        verify: tuple[int, ...], mixed: bool, what: str) -> Any:
        """Decode graphs up to max_cudagraph_capture_size requests and, where the backend
        allows, mixed-step graphs up to that many tokens (as vLLM's capture sizes count
        tokens) or verify graphs when speculating."""
        from pagedllm.worker.cuda_graphs import StepGraphs

        start = time.perf_counter()
        sched = self.config.scheduler
        cap = self.config.device.max_cudagraph_capture_size
        graphs = StepGraphs(
            model, kv_caches, self.device,
            max_batch_size=min(sched.max_num_seqs, cap),
            max_blocks_per_seq=cdiv(sched.max_model_len, self.block_size),
            verify_query_lens=verify,
            max_mixed_tokens=min(cap, sched.max_num_batched_tokens) if mixed else 0,
            max_num_reqs=sched.max_num_seqs)
        graphs.capture()
        logger.info("Captured %d CUDA graphs%s: decode batches up to %d%s%s in %.1f s",
                    len(graphs.graphs), what, graphs.sizes[-1],
                    f", verify batches up to {graphs.verify_sizes[-1]} of 1 + 1..."
                    f"{verify[-1] - 1} tokens" if verify else "",
                    f", mixed steps up to {graphs.mixed_sizes[-1]} tokens"
                    if graphs.mixed_sizes else "",
                    time.perf_counter() - start)
        return graphs


def first_row_of(num_rows: list[int]) -> np.ndarray:
    """The first row of each request whose rows lie back to back, `num_rows` each."""
    return np.cumsum([0] + num_rows[:-1]).astype(np.int64)


def _expand_forks(ids: list[str], states: list[Any], params: list[SamplingParams],
                  forks: dict[str, list[tuple[str, SamplingParams]]]) -> tuple[
        list[str], list[Any], list[SamplingParams], list[int]]:
    """Rows to sample: each request, followed by the samples to fork off it, which draw
    their first token from the same logits row. Returns ids, states (None for a forked
    sample), params and the source row of each."""
    out_ids: list[str] = []
    out_states: list[Any] = []
    out_params: list[SamplingParams] = []
    rows: list[int] = []
    for i, rid in enumerate(ids):
        out_ids.append(rid)
        out_states.append(states[i])
        out_params.append(params[i])
        rows.append(i)
        for child_id, child_params in forks.get(rid, ()):
            out_ids.append(child_id)
            out_states.append(None)
            out_params.append(child_params)
            rows.append(i)
    return out_ids, out_states, out_params, rows
