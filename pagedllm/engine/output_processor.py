"""Turns per-sequence engine progress into RequestOutputs (n > 1 children grouped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.logprobs import TokenTexts, logprob_dicts
from pagedllm.engine.messages import EngineCoreOutput
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.worker.output import LogprobsLists


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
    prompt_logprobs_sent: bool = False
    arrival_time: float = 0.0

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
        self.token_texts = TokenTexts(tokenizer)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[str], arrival_time: float) -> None:
        ranked = params.wants_logprobs
        children = {
            cid: SequenceState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                         params),
                               cumulative_logprob=0.0 if ranked else None,
                               logprobs=[] if params.logprobs is not None else None)
            for i, cid in enumerate(child_ids)
        }
        self.parents[request_id] = ParentState(
            request_id, prompt, prompt_token_ids, params, children, arrival_time=arrival_time,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        for cid in child_ids:
            self.child_to_parent[cid] = request_id

    def parent_of(self, child_id: str) -> str | None:
        return self.child_to_parent.get(child_id)

    def children_of(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return list(parent.children) if parent else []

    def process(self, outputs: list[EngineCoreOutput]
                ) -> tuple[list[RequestOutput], list[str]]:
        """Detokenize the core's new tokens and check stop strings; returns (outputs to
        deliver, sequence ids hit by a stop string, which the core must now finish)."""
        touched: dict[str, ParentState] = {}
        stop_hits: list[str] = []
        parents = self.parents
        child_to_parent = self.child_to_parent
        for core_out in outputs:
            pid = child_to_parent.get(core_out.request_id)
            if pid is None:
                continue  # finished or aborted here meanwhile
            parent = parents[pid]
            if core_out.prompt_logprobs is not None:
                self._add_prompt_logprobs(parent, core_out.prompt_logprobs)
            seq = parent.children[core_out.request_id]
            touched[pid] = parent
            if seq.finish_reason is not None:
                continue  # stopped by a stop string; the core has not heard yet
            if core_out.num_cached_tokens and not parent.num_cached_tokens:
                parent.num_cached_tokens = core_out.num_cached_tokens
            if core_out.logprobs is not None:
                self._add_logprobs(parent, seq, core_out.logprobs)
            stop = None
            for token in core_out.new_token_ids:
                seq.token_ids.append(token)
                stop = seq.detokenizer.add_token(token)
                if stop is not None:
                    break
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                if core_out.finish_reason is None:
                    stop_hits.append(core_out.request_id)
            elif core_out.finish_reason is not None:
                seq.finish_reason, seq.stop_reason = core_out.finish_reason, core_out.stop_reason
        delivered = []
        for parent in touched.values():
            finished = parent.finished
            if not finished and parent.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue  # nothing to deliver before the end (the common offline case)
            out = self._make_output(parent)
            if out is not None:
                delivered.append(out)
            if finished:
                self._remove(parent)
        return delivered, stop_hits

    def _add_logprobs(self, parent: ParentState, seq: SequenceState,
                      lists: LogprobsLists) -> None:
        if seq.cumulative_logprob is not None:
            seq.cumulative_logprob += float(lists.logprobs[:, 0].sum())
        if seq.logprobs is not None:
            decode = self.token_texts if parent.params.detokenize else None
            seq.logprobs.extend(logprob_dicts(lists, parent.params.logprobs or 0, decode))

    def _add_prompt_logprobs(self, parent: ParentState, lists: LogprobsLists) -> None:
        """Append prompt logprob rows in position order; rows recomputed after a
        preemption (positions already held) are dropped."""
        if parent.prompt_logprobs is None:
            return
        skip = len(parent.prompt_logprobs) - lists.start
        if skip < 0 or skip >= len(lists):
            return
        rows = LogprobsLists(lists.token_ids[skip:], lists.logprobs[skip:], lists.ranks[skip:])
        decode = self.token_texts if parent.params.detokenize else None
        parent.prompt_logprobs.extend(
            logprob_dicts(rows, parent.params.prompt_logprobs or 0, decode))

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
        params = parent.params
        kind = params.output_kind
        finished = parent.finished
        # best_of > n: the n best samples are known only once all have finished.
        pick_best = params.best_of > params.n
        if (kind == RequestOutputKind.FINAL_ONLY or pick_best) and not finished and not force:
            return None
        seqs = list(parent.children.values())
        if pick_best:
            seqs = sorted(seqs, key=lambda q: q.cumulative_logprob or 0.0,
                          reverse=True)[:params.n]
        completions = []
        for rank, seq in enumerate(seqs):
            done = seq.finish_reason is not None
            if kind == RequestOutputKind.DELTA:
                text = seq.detokenizer.new_text(done)
                token_ids = seq.token_ids[seq.num_sent_tokens:]
                logprobs = (seq.logprobs[seq.num_sent_tokens:] if seq.logprobs is not None
                            else None)
                if not text and not token_ids and not done:
                    continue
            else:
                text = seq.detokenizer.emittable_text(done)
                token_ids = list(seq.token_ids)
                logprobs = list(seq.logprobs) if seq.logprobs is not None else None
            seq.num_sent_tokens = len(seq.token_ids)
            completions.append(CompletionOutput(
                index=rank if pick_best else seq.index, text=text, token_ids=token_ids,
                cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if not completions and not finished:
            return None
        prompt_logprobs = parent.prompt_logprobs
        if kind == RequestOutputKind.DELTA:  # sent once, with the first output
            if parent.prompt_logprobs_sent:
                prompt_logprobs = None
            parent.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished or force,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
        )
