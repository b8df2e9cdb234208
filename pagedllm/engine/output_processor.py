"""Turns per-sequence engine progress into RequestOutputs (n > 1 children grouped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.logprobs import TokenTexts, logprob_dicts
from pagedllm.engine.request import Request
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.worker.output import LogprobsLists, ModelRunnerOutput


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
        self.token_texts = TokenTexts(tokenizer)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[str], arrival_time: float) -> None:
        ranked = params.logprobs is not None or params.best_of > params.n
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

    def process(self, updated: list[Request], finished_elsewhere: list[Request],
                runner_out: ModelRunnerOutput | None = None,
                ) -> tuple[list[RequestOutput], list[str]]:
        """Detokenize new tokens (and take their logprobs from runner_out); returns
        (outputs to deliver, child ids hit by a stop string that the scheduler must now
        finish)."""
        touched: dict[str, ParentState] = {}
        stop_hits: list[str] = []
        sample_lp: dict[str, LogprobsLists] = {}
        if runner_out is not None:
            sample_lp = runner_out.logprobs
            if runner_out.prompt_logprobs:
                self._add_prompt_logprobs(runner_out.prompt_logprobs)
        for req in updated:
            pid = self.child_to_parent.get(req.request_id)
            if pid is None:
                continue
            parent = self.parents[pid]
            seq = parent.children[req.request_id]
            token = req.output_token_ids[-1]
            seq.token_ids.append(token)
            if sample_lp:
                lists = sample_lp.get(req.request_id)
                if lists is not None:
                    self._add_logprobs(parent, seq, lists)
            stop = seq.detokenizer.add_token(token)
            if parent.num_cached_tokens == 0 and req.num_cached_tokens > 0:
                parent.num_cached_tokens = req.num_cached_tokens
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
            finished = parent.finished
            if not finished and parent.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue  # nothing to deliver before the end (the common offline case)
            out = self._make_output(parent)
            if out is not None:
                outputs.append(out)
            if finished:
                self._remove(parent)
        return outputs, stop_hits

    def _add_logprobs(self, parent: ParentState, seq: SequenceState,
                      lists: LogprobsLists) -> None:
        if seq.cumulative_logprob is not None:
            seq.cumulative_logprob += float(lists.logprobs[:, 0].sum())
        if seq.logprobs is not None:
            decode = self.token_texts if parent.params.detokenize else None
            seq.logprobs.extend(logprob_dicts(lists, parent.params.logprobs or 0, decode))

    def _add_prompt_logprobs(self, chunks: dict[str, LogprobsLists]) -> None:
        """Append prompt logprob rows in position order; rows recomputed after a
        preemption (positions already held) are dropped."""
        for rid, lists in chunks.items():
            pid = self.child_to_parent.get(rid)
            parent = self.parents.get(pid) if pid is not None else None
            if parent is None or parent.prompt_logprobs is None:
                continue
            skip = len(parent.prompt_logprobs) - lists.start
            if skip < 0 or skip >= len(lists):
                continue
            rows = LogprobsLists(lists.token_ids[skip:], lists.logprobs[skip:],
                                 lists.ranks[skip:])
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
