"""LLMEngine: the synchronous step loop tying scheduler, model runner and outputs together."""

from __future__ import annotations

import logging
import time
from typing import Any

from pagedllm.config import EngineArgs, EngineConfig
from pagedllm.engine.input_processor import (
    PromptType,
    eos_token_ids,
    load_tokenizer,
    tokenize_prompt,
)
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.metrics.stats import StatsCollector
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.utils import cdiv
from pagedllm.worker.logits_processors import bad_words_token_ids, needs_processing
from pagedllm.worker.output import ModelRunnerOutput

logger = logging.getLogger(__name__)


class LLMEngine:
    """Accepts requests, runs scheduler steps on the model, and returns RequestOutputs."""

    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        self.config = config
        self.model_config = config.model
        if config.model.runner != "generate":
            raise ValueError(
                f"{config.model.architecture} was loaded with runner="
                f"{config.model.runner!r}; text generation needs runner='generate'."
            )
        if config.model.skip_tokenizer_init:
            self.tokenizer = None
            eos = getattr(config.model.hf_config, "eos_token_id", None)
            self.eos_token_id = eos[0] if isinstance(eos, list) and eos else eos
            self.extra_eos_ids: set[int] = set(eos[1:]) if isinstance(eos, list) else set()
        else:
            self.tokenizer = load_tokenizer(config.model)
            self.eos_token_id, self.extra_eos_ids = eos_token_ids(config.model, self.tokenizer)
        from pagedllm.worker.executor import make_executor

        self.executor = make_executor(config)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self._check_kv_capacity(num_blocks)
            self.executor.allocate_kv_cache(num_blocks)
            self.executor.warm_up()
        except BaseException:
            self.executor.shutdown()  # tensor-parallel workers must not outlive a failed start
            raise
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_blocks = num_blocks
        self._finished_by_abort: list[Request] = []
        # Async scheduling: the launched step whose sampled tokens are not processed yet.
        self._in_flight: tuple[SchedulerOutput, Any] | None = None
        # Per-step stats (timestamps, token counts); AsyncLLM turns it on for its loggers.
        self.stats: StatsCollector | None = None
        logger.info(
            "Engine ready in %.1f s: model %s on %s, %d KV blocks of %d tokens "
            "(max concurrency %.1f requests of %d tokens)",
            time.perf_counter() - start, config.model.model, config.device.device, num_blocks,
            config.cache.block_size,
            num_blocks * config.cache.block_size / config.model.max_model_len,
            config.model.max_model_len)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def _check_kv_capacity(self, num_blocks: int) -> None:
        needed = cdiv(self.model_config.max_model_len, self.config.cache.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"The KV cache has room for {num_blocks} blocks "
                f"({num_blocks * self.config.cache.block_size} tokens), fewer than one request of "
                f"max_model_len={self.model_config.max_model_len} needs ({needed} blocks). Raise "
                "gpu_memory_utilization or kv_cache_memory_bytes, or lower max_model_len."
            )

    # ------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None,
                    prompt_text: str | None = None) -> None:
        """Queue a request (n > 1 becomes n child sequences sharing the prompt's blocks)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(params).__name__}."
            )
        if request_id in self.output_processor.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        if prompt_token_ids is None:
            prompt_text, prompt_token_ids = tokenize_prompt(
                prompt, self.tokenizer, self.model_config, params)
        self.prepare_params(params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        n = params.best_of or params.n
        child_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        self.output_processor.add_request(request_id, prompt_text, prompt_token_ids, params,
                                          child_ids, arrival)
        seqs = [Request(cid, prompt_token_ids, _child_params(params, i), self.eos_token_id,
                        arrival, max_total_tokens=self.model_config.max_model_len)
                for i, cid in enumerate(child_ids)]
        # One request computes the prompt; the others fork off it when it samples.
        seqs[0].pending_forks = seqs[1:]
        seqs[0].sampling_extras = seqs[0].sampling_extras or n > 1
        self.scheduler.add_request(seqs[0])

    def prepare_params(self, params: SamplingParams) -> None:
        """Fill engine-known parts of the params (extra EOS ids, bad words) and check
        limits that depend on the model."""
        params._all_stop_token_ids |= self.extra_eos_ids
        if self.tokenizer is None:
            if params.stop:
                raise ValueError("stop strings need a tokenizer; the engine was started with "
                                 "skip_tokenizer_init=True.")
            params.detokenize = False
        vocab = self.model_config.vocab_size
        for name in ("stop_token_ids", "allowed_token_ids"):
            for tid in getattr(params, name) or []:
                if tid >= vocab:
                    raise ValueError(f"{name} holds {tid}, outside the vocabulary of {vocab}.")
        for tid in params.logit_bias or {}:
            if not 0 <= tid < vocab:
                raise ValueError(f"logit_bias token {tid} is outside the vocabulary of {vocab}.")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer; the engine was started with "
                                 "skip_tokenizer_init=True.")
            params._bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
            bad = [t for ids in params._bad_words_token_ids for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"bad_words tokenize to id {bad[0]}, outside the model's "
                                 f"vocabulary of {vocab}.")
        max_seqs = self.config.scheduler.max_num_seqs
        if params.best_of > max_seqs:
            raise ValueError(f"n / best_of ({params.best_of}) is more than max_num_seqs "
                             f"({max_seqs}), the most sequences one step can run.")
        max_lp = self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and (vocab if value == -1 else value) > max_lp:
                raise ValueError(
                    f"{name}={value} asks for more than max_logprobs={max_lp} alternatives "
                    f"(-1 means the whole vocabulary of {vocab}); raise max_logprobs or ask "
                    "for fewer.")

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        """Stop requests now and free their KV blocks; returns their final outputs
        (finish_reason "abort" for sequences that had not finished)."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        finals = []
        for rid in request_ids:
            children = self.output_processor.children_of(rid)
            if self.stats is not None:
                for cid in children:
                    req = self.scheduler.requests.get(cid)
                    if req is not None and not req.is_finished:
                        self.stats.record_finished(req, reason="abort")
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
            final = self.output_processor.abort(rid)
            if final is not None:
                finals.append(final)
        return finals

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)

    # ------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return outputs of requests that progressed.

        With async scheduling, a step of plain requests is launched before the previous
        step's tokens are processed, so that host work overlaps the GPU; its own outputs
        come with the next call. Other steps first collect the one in flight."""
        sched_out = self.scheduler.schedule()
        if self._can_overlap(sched_out):
            pending = self.executor.execute_async(sched_out)
            self.scheduler.mark_launched(sched_out)
            outputs = self._collect_in_flight()
            self._in_flight = (sched_out, pending)
            return outputs
        outputs = self._collect_in_flight()
        if sched_out.is_empty and not sched_out.block_copies:
            return outputs
        runner_out = self.executor.execute(sched_out)
        return outputs + self._process(sched_out, runner_out, launched=False)

    def _can_overlap(self, sched_out: SchedulerOutput) -> bool:
        if not self.config.scheduler.async_scheduling or sched_out.is_empty:
            return False
        if sched_out.block_copies or not hasattr(self.executor, "execute_async"):
            return False
        return not any(it.request.sampling_extras or it.request.pending_forks
                       or needs_processing(it.request) for it in sched_out.scheduled)

    def _collect_in_flight(self) -> list[RequestOutput]:
        if self._in_flight is None:
            return []
        sched_out, pending = self._in_flight
        self._in_flight = None
        return self._process(sched_out, self.executor.fetch(pending), launched=True)

    def _process(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput,
                 launched: bool) -> list[RequestOutput]:
        updated = self.scheduler.update(sched_out, runner_out.sampled, launched=launched)
        outputs, stop_hits = self.output_processor.process(updated, [], runner_out)
        if stop_hits:
            self.scheduler.finish_requests(stop_hits, RequestStatus.FINISHED_STOPPED)
        if self.stats is not None:
            self.stats.record_step(updated)
        return outputs

    def get_stats(self) -> dict[str, Any]:
        s = self.scheduler.stats()
        return {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "num_free_blocks": s.num_free_blocks,
            "num_total_blocks": s.num_total_blocks,
            "num_cached_blocks": s.num_cached_free_blocks,
            "kv_cache_usage": s.kv_usage,
            "prefix_cache_queries": s.prefix_queries,
            "prefix_cache_hits": s.prefix_hits,
            "num_preemptions": s.num_preemptions,
        }

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Params of sample `index` of a request: seeds differ per sample, and only the first
    sample (the one that runs the prompt) computes prompt logprobs."""
    if index == 0 or (params.seed is None and params.prompt_logprobs is None):
        return params
    child = params.clone()
    if params.seed is not None:
        child.seed = params.seed + index
    child.prompt_logprobs = None
    return child
