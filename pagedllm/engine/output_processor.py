"""Turns per-sequence engine progress into RequestOutputs (n > 1 children grouped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.request import Request
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class SequenceState:
    """Output-side state of one child sequence."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    num_sent_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[Any] | None = None


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: dict[str, SequenceState]
    num_cached_tokens: int = 0
    prompt_logprobs: Any = None
    arrival_time: float = 0.0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        if len(self.children) == 1:
            return next(iter(self.children.values())).finish_reason is not None
        return all(c.finish_reason is not None for c in self.children.values())


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[str], arrival_time: float) -> None:
        children = {
            cid: SequenceState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                         params))
            for i, cid in enumerate(child_ids)
        }
        self.parents[request_id] = ParentState(request_id, prompt, prompt_token_ids, params,
                                               children, arrival_time=arrival_time)
        for cid in child_ids:
            self.child_to_parent[cid] = request_id

    def parent_of(self, child_id: str) -> str | None:
        return self.child_to_parent.get(child_id)

    def children_of(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return list(parent.children) if parent else []

    def process(self, updated: list[Request], finished_elsewhere: list[Request]
                ) -> tuple[list[RequestOutput], list[str]]:
        """Detokenize new tokens; returns (outputs to deliver, child ids hit by a stop
        string that the scheduler must now finish)."""
        touched: dict[str, ParentState] = {}
        stop_hits: list[str] = []
        for req in updated:
            pid = self.child_to_parent.get(req.request_id)
            if pid is None:
                continue
            parent = self.parents[pid]
            seq = parent.children[req.request_id]
            token = req.output_token_ids[-1]
            seq.token_ids.append(token)
            if req.logprobs:
                seq.logprobs = req.logprobs
                seq.cumulative_logprob = req.cumulative_logprob
            stop = seq.detokenizer.add_token(token)
            if parent.num_cached_tokens == 0 and req.num_cached_tokens > 0:
                parent.num_cached_tokens = req.num_cached_tokens
            if parent.prompt_logprobs is None and req.prompt_logprobs:
                parent.prompt_logprobs = req.prompt_logprobs
            if parent.first_token_time is None:
                parent.first_token_time = req.first_token_time
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                if not req.is_finished:
                    stop_hits.append(req.request_id)
            elif req.is_finished:
                seq.finish_reason, seq.stop_reason = req.finish_reason, req.stop_reason
            touched[pid] = parent
        for req in finished_elsewhere:
            pid = self.child_to_parent.get(req.request_id)
            if pid is None:
                continue
            parent = self.parents[pid]
            seq = parent.children[req.request_id]
            if seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = req.finish_reason, req.stop_reason
            touched[pid] = parent
        outputs = []
        for parent in touched.values():
            out = self._make_output(parent)
            if out is not None:
                outputs.append(out)
            if parent.finished:
                self._remove(parent)
        return outputs, stop_hits

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark all children of a parent aborted; returns its final output."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for seq in parent.children.values():
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        out = self._make_output(parent, force=True)
        self._remove(parent)
        return out

    def _remove(self, parent: ParentState) -> None:
        self.parents.pop(parent.request_id, None)
        for cid in parent.children:
            self.child_to_parent.pop(cid, None)

    def _make_output(self, parent: ParentState, force: bool = False) -> RequestOutput | None:
        kind = parent.params.output_kind
        finished = parent.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished and not force:
            return None
        completions = []
        for seq in parent.children.values():
            done = seq.finish_reason is not None
            if kind == RequestOutputKind.DELTA:
                text = seq.detokenizer.new_text(done)
                token_ids = seq.token_ids[seq.num_sent_tokens:]
                logprobs = seq.logprobs[seq.num_sent_tokens:] if seq.logprobs else None
                if not text and not token_ids and not done:
                    continue
            else:
                text = seq.detokenizer.emittable_text(done)
                token_ids = list(seq.token_ids)
                logprobs = list(seq.logprobs) if seq.logprobs else None
            seq.num_sent_tokens = len(seq.token_ids)
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=token_ids,
                cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if not completions and not finished:
            return None
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished or force,
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
        )
