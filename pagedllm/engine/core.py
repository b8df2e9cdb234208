"""EngineCore: scheduler, KV cache manager and executor stepping the model.

The core takes tokenized, validated requests and turns each step into `EngineCoreOutput`s
(new token ids, finish reasons, logprob arrays). It knows no tokenizer and no HTTP: text,
stop strings and output objects belong to the front-end (`OutputProcessor`). It runs in the
caller's process (offline `LLM`) or in a process of its own (`core_proc`, the server).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.messages import EngineCoreOutput, EngineCoreRequest, child_request_ids
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.metrics.stats import IterationStats, SchedulerSnapshot, StatsCollector
from pagedllm.sampling_params import SamplingParams
from pagedllm.utils import cdiv
from pagedllm.worker.output import GrammarOutput, ModelRunnerOutput

logger = logging.getLogger(__name__)

_FINISH_STATUS = {"abort": RequestStatus.FINISHED_ABORTED, "stop": RequestStatus.FINISHED_STOPPED}


class EngineCore:
    """Steps the model over the scheduled batch; one instance per engine."""

    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        self.config = config
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
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks,
                                   config.speculative)
        self.stats = StatsCollector()
        # request id -> ids of its sequences (n > 1 requests have several)
        self._children: dict[str, list[str]] = {}
        self._parent_of: dict[str, str] = {}
        # The launched step whose results are not processed yet (kept between calls with
        # async scheduling only).
        self._in_flight: tuple[SchedulerOutput, Any] | None = None
        self.structured_outputs: Any = None  # StructuredOutputManager, made on first use
        model = config.model
        logger.info(
            "Engine core ready in %.1f s: model %s on %s, %d KV blocks of %d tokens "
            "(max concurrency %.1f requests of %d tokens)",
            time.perf_counter() - start, model.model, config.device.device, num_blocks,
            config.cache.block_size, num_blocks * config.cache.block_size / model.max_model_len,
            model.max_model_len)

    def _check_kv_capacity(self, num_blocks: int) -> None:
        block_size = self.config.cache.block_size
        max_len = self.config.model.max_model_len
        needed = cdiv(max_len, block_size)
        if num_blocks < needed:
            raise ValueError(
                f"The KV cache has room for {num_blocks} blocks ({num_blocks * block_size} "
                f"tokens), fewer than one request of max_model_len={max_len} needs ({needed} "
                "blocks). Raise gpu_memory_utilization or kv_cache_memory_bytes, or lower "
                "max_model_len.")

    # ------------------------------------------------------------ requests
    def add_request(self, request: EngineCoreRequest) -> list[str]:
        """Queue a request from a front-end; returns the ids of its sequences."""
        return self.add(request.request_id, request.prompt_token_ids,
                        request.sampling_params(), request.eos_token_id, request.arrival_time)

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            eos_token_id: int | None, arrival_time: float) -> list[str]:
        """Queue a request; n > 1 becomes n sequences that fork off the first."""
        if request_id in self._children:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        child_ids = child_request_ids(request_id, params.best_of or params.n)
        max_len = self.config.model.max_model_len
        seqs = [Request(cid, prompt_token_ids, _child_params(params, i), eos_token_id,
                        arrival_time, max_total_tokens=max_len)
                for i, cid in enumerate(child_ids)]
        # One sequence computes the prompt; the others fork off it when it samples.
        seqs[0].pending_forks = seqs[1:]
        self._children[request_id] = child_ids
        for cid in child_ids:
            self._parent_of[cid] = request_id
        so = params.structured_outputs
        if so is not None:
            manager = self._structured_output_manager()
            for seq in seqs:  # each sequence its own matcher (one compile, cached by spec)
                seq.structured_output_request = manager.grammar_init(
                    so, params._structured_outputs_backend)
        self.scheduler.add_request(seqs[0])
        return child_ids

    def _structured_output_manager(self) -> Any:
        """The engine's grammar compiler and bitmask, made with the first constrained
        request (the core loads the tokenizer for it; its token tables are built on the
        compile threads)."""
        if self.structured_outputs is None:
            from pagedllm.engine.input_processor import eos_token_ids, load_tokenizer
            from pagedllm.structured_output import StructuredOutputManager

            model = self.config.model
            tokenizer = load_tokenizer(model)
            eos, extra = eos_token_ids(model, tokenizer)
            stops = ([eos] if eos is not None else []) + sorted(extra)
            spec = self.config.speculative
            k = spec.num_speculative_tokens if spec is not None else 0
            # Each verified position of a speculating request has its own bitmask row.
            self.structured_outputs = StructuredOutputManager(
                tokenizer, model.vocab_size, self.config.structured_outputs,
                stop_token_ids=stops or None,
                max_rows=self.config.scheduler.max_num_seqs * (1 + k),
                max_rollback_tokens=k, device=self.config.device.torch_device)
        return self.structured_outputs

    def abort(self, request_ids: list[str], reason: str = "abort") -> list[str]:
        """Finish requests (their ids as added, or one sequence's id) wherever they are and
        free their blocks; `reason` "stop" is a stop string the front-end found. Returns the
        ids of the sequences it finished."""
        status = _FINISH_STATUS[reason]
        finished: list[str] = []
        for rid in request_ids:
            children = self._children.pop(rid, None)
            if children is None:
                if rid not in self._parent_of:
                    continue
                children = [rid]  # one sequence of an n > 1 request
                self._forget(rid)
            else:
                for cid in children:
                    self._parent_of.pop(cid, None)
            for cid in children:
                req = self.scheduler.requests.get(cid)
                if req is not None and not req.is_finished:
                    self.stats.record_finished(req, reason=reason)
            self.scheduler.finish_requests(children, status)
            finished.extend(children)
        return finished

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # ------------------------------------------------------------ step
    def step(self) -> list[EngineCoreOutput]:
        """Schedule, launch the model once, and return the progress of every sequence.

        Every step takes the one path: `mark_launched`, then `execute` (which returns before
        the device is done). With async scheduling the step stays in flight and its outputs
        come with the next call, so that host work overlaps the device; the step before is
        collected once this one's forward is launched: before its logits pipeline when that
        needs the previous tokens (grammar, penalties), else after its sampler is queued.
        Without async scheduling each step is collected right away."""
        sched_out = self.scheduler.schedule()
        outputs = self._failed_outputs()
        if sched_out.is_empty and not sched_out.block_copies:
            return outputs + self._collect_in_flight()

        def before_sample() -> GrammarOutput | None:
            if sched_out.needs_host_tokens:
                outputs.extend(self._collect_in_flight())
            return self._grammar_output(sched_out)

        self.scheduler.mark_launched(sched_out)
        pending = self.executor.execute(sched_out, before_sample)
        outputs.extend(self._collect_in_flight())
        self._in_flight = (sched_out, pending)
        if not self.config.scheduler.async_scheduling:
            outputs.extend(self._collect_in_flight())
        return outputs

    def _grammar_output(self, sched_out: SchedulerOutput) -> GrammarOutput | None:
        """Fill the bitmask rows of the step's constrained requests (their grammars have
        taken every token before this step's)."""
        if not sched_out.grammar_rows:
            return None
        requests = self.scheduler.requests
        drafts = sched_out.scheduled_draft_tokens
        rows = []
        for rid, row in sched_out.grammar_rows.items():
            req = requests.get(rid)
            if req is not None and not req.is_finished:
                rows.append((req.structured_output_request, row, drafts.get(rid, ())))
        manager = self.structured_outputs
        return GrammarOutput(manager.bitmask, manager.fill_bitmask(rows))

    def _failed_outputs(self) -> list[EngineCoreOutput]:
        """Requests the scheduler finished while waiting (their grammar failed to compile)."""
        if not self.scheduler.failed:
            return []
        failed, self.scheduler.failed = self.scheduler.failed, []
        outputs = []
        for req in failed:
            self.stats.record_finished(req, reason="abort")
            self._forget(req.request_id)
            outputs.append(EngineCoreOutput(req.request_id, [], req.finish_reason))
        return outputs

    def _collect_in_flight(self) -> list[EngineCoreOutput]:
        if self._in_flight is None:
            return []
        sched_out, pending = self._in_flight
        self._in_flight = None
        return self._process(sched_out, self.executor.fetch(pending))

    def _process(self, sched_out: SchedulerOutput,
                 runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        updated = self.scheduler.update(sched_out, runner_out.sampled,
                                        runner_out.draft_token_ids)
        self.stats.record_step(updated)
        if sched_out.scheduled_draft_tokens:
            self.stats.record_spec_decode(sched_out.scheduled_draft_tokens, runner_out.sampled)
        logprobs = runner_out.logprobs
        outputs = []
        for req in updated:
            finish = req.finish_reason
            if finish is not None:
                self._forget(req.request_id)
            lp = logprobs.get(req.request_id) if logprobs else None
            if lp is not None and len(lp) > req.num_new_tokens:  # a stop inside a draft run
                lp = lp.head(req.num_new_tokens)
            outputs.append(EngineCoreOutput(
                req.request_id, req.output_token_ids[-req.num_new_tokens:], finish,
                req.stop_reason if isinstance(req.stop_reason, int) else None,
                max(req.num_cached_tokens, 0), lp))
        if runner_out.prompt_logprobs:
            for rid, lists in runner_out.prompt_logprobs.items():
                outputs.append(EngineCoreOutput(rid, [], prompt_logprobs=lists))
        return outputs

    def _forget(self, child_id: str) -> None:
        """Drop a finished sequence from its request; the request goes with its last one."""
        parent = self._parent_of.pop(child_id, None)
        children = self._children.get(parent) if parent is not None else None
        if children is None:
            return
        if all(cid not in self._parent_of for cid in children):
            del self._children[parent]

    # ------------------------------------------------------------ introspection
    def take_stats(self) -> tuple[IterationStats, SchedulerSnapshot]:
        """This turn's iteration stats and a constant-time view of the scheduler."""
        return self.stats.take(), self.stats.snapshot(self.scheduler)

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

    def dashboard_view(self, max_cells: int) -> dict[str, Any]:
        """Queues and the KV block map, read between two steps."""
        from pagedllm.metrics.block_map import block_map

        scheduler = self.scheduler
        kv = scheduler.kv
        return {
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "kv_cache_usage": kv.usage,
            "prefix_cache_queries": kv.prefix_queries,
            "prefix_cache_hits": kv.prefix_hits,
            "num_preemptions": scheduler.num_preemptions,
            "block_size": kv.block_size,
            "blocks": block_map(kv.pool, max_cells),
        }

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    def shutdown(self) -> None:
        if self.structured_outputs is not None:
            self.structured_outputs.shutdown()
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
