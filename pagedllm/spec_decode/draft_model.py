"""A draft model for speculative decoding, in the target's process and on its device.

Its KV cache has one slot for every slot of the target's (same number of blocks, same block
ids), so the target's block manager allocates, shares, forks, rolls back and prefix-caches
both at once: every step the draft computes the same tokens as the target into the same
slots (`forward`). After verification it proposes K tokens per sampled request, one
single-token forward at a time from the request's last token (`propose`), greedily for
greedy requests, else sampled from its own processed distribution q (kept for the next
step's rejection sampler). The proposals' KV lands in slots past the request's known
tokens (the scheduler's lookahead slots), which the next step's forward overwrites. The
request's logits processors shape q as they shape the target's distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedllm.models.loader.model_loader import load_model
from pagedllm.sampling_params import SamplingType
from pagedllm.spec_decode.positions import DraftPosition
from pagedllm.worker.logits_processors import apply_logits_processors, needs_processing
from pagedllm.worker.sampler import random_sample

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig
    from pagedllm.engine.scheduler import SchedulerOutput
    from pagedllm.worker.model_runner import ModelRunner
    from pagedllm.worker.step_inputs import StepInputs


class DraftModel:
    """The draft model, its KV cache and its pending proposal distributions."""

    def __init__(self, config: EngineConfig, backend: Any, device: torch.device) -> None:
        assert config.draft_model is not None and config.speculative is not None
        self.model = load_model(config.draft_model, backend.get_impl_cls(), device)
        self.num_tokens = config.speculative.num_speculative_tokens
        self.max_model_len = config.model.max_model_len
        self.device = device
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: Any = None  # StepGraphs (decode and verify shapes) once captured
        # request id -> q [k, V] of its last sampled proposal (greedy ones: a point mass,
        # not stored).
        self._q: dict[str, torch.Tensor] = {}

    @property
    def kv_dtype(self) -> torch.dtype:
        """The draft's KV cache keeps its weights' dtype."""
        return next(iter(self.model.parameters())).dtype

    def allocate_kv_cache(self, num_blocks: int, alloc: Callable[..., torch.Tensor],
                          shape: Callable[[Any, int], tuple[int, ...]]) -> None:
        self.kv_caches = [alloc(shape(spec, num_blocks), dtype=self.kv_dtype, device=self.device)
                          for spec in self.model.kv_cache_specs()]

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._q.pop(rid, None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: Any) -> None:
        """Compute the step's tokens into the draft's cache (same slots as the target)."""
        self._run(input_ids, positions, md)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: Any) -> torch.Tensor:
        """Hidden states: from a captured CUDA graph when the step's shape has one."""
        if self.graphs is not None:
            return self.graphs.run(input_ids, positions, md)
        return self.model(input_ids, positions, self.kv_caches, md)

    def draft_probs(self, ids: list[str], drafts: list[list[int]],
                    vocab: int) -> torch.Tensor | None:
        """q of every verified draft token, request by request ([sum K, V]; a one-hot row
        for greedy proposals), or None when all of them were greedy."""
        if not any(rid in self._q for rid, d in zip(ids, drafts) if d):
            return None
        parts = []
        for rid, d in zip(ids, drafts):
            if not d:
                continue
            q = self._q.get(rid)
            if q is None:
                q = torch.zeros(len(d), vocab, device=self.device)
                q[torch.arange(len(d)), torch.tensor(d)] = 1.0
            parts.append(q[:len(d)])
        return torch.cat(parts)

    @torch.inference_mode()
    def propose(self, runner: ModelRunner, out: SchedulerOutput, step: StepInputs,
                batch_rows: tuple[list[str], list[Any], list[list[int]]],
                tokens: list[list[int]]) -> dict[str, list[int]]:
        """K proposals for each sampled request of the step (`tokens`: what it kept: the
        accepted drafts and one more), within the KV slots it holds."""
        ids, states, drafts = batch_rows
        where = {rid: i for i, rid in enumerate(out.req_ids)}
        bs = runner.block_size
        rows = []
        for rid, st, d, kept in zip(ids, states, drafts, tokens):
            pos = int(step.seq_lens[where[rid]]) - len(d) + len(kept) - 1  # of kept[-1]
            k = min(self.num_tokens, st.num_blocks * bs - pos, self.max_model_len - pos)
            if k > 0:
                rows.append((rid, st, kept[-1], pos, k, kept))
        for rid, *_ in rows:
            self._q.pop(rid, None)
        if not rows:
            return {}
        num = len(rows)
        ks = np.array([r[4] for r in rows])
        pos0 = np.array([r[3] for r in rows], dtype=np.int64)
        width = max(r[1].num_blocks for r in rows)
        table = np.zeros((num, width), dtype=np.int32)
        for i, r in enumerate(rows):
            table[i, :r[1].num_blocks] = r[1].block_row
        row_ids = [r[0] for r in rows]
        params = [r[1].sampling_params for r in rows]
        md = runner._sampling_metadata([r[1] for r in rows], params, row_ids)
        sampled_rows = [i for i, p in enumerate(params) if p.sampling_type != SamplingType.GREEDY]
        qsl = np.arange(num + 1, dtype=np.int32)
        current = torch.tensor([r[2] for r in rows], dtype=torch.long).to(self.device)
        # The logits processors (allowed ids, bias, penalties, ...) shape q as they shape
        # the target's p, seeing the proposals so far: closer proposals, more accepted.
        processing = any(needs_processing(r[1]) for r in rows)
        # The runner's copy of the request's tokens gets this step's at `fetch`.
        history: list[list[int]] = [list(r[5]) for r in rows]
        proposed, qs = [], []
        for j in range(int(ks.max())):
            # Rows past their own k write a position they hold (past their known tokens,
            # so overwritten before it is read); their proposals are dropped.
            pos = pos0 + np.minimum(j, ks - 1)
            slots = (table[np.arange(num), pos // bs].astype(np.int64) * bs + pos % bs)
            attn = runner._metadata(qsl, (pos + 1).astype(np.int32), table, slots, num)
            hidden = self._run(current, torch.from_numpy(pos).to(self.device), attn)
            logits = self.model.compute_logits(hidden)
            if processing:
                if j:
                    for h, token in zip(history, current.tolist()):
                        h.append(token)
                logits = apply_logits_processors(
                    logits.float(), [DraftPosition(r[1], h) for r, h in zip(rows, history)])
            greedy, processed = runner.sampler.process(logits, md)
            if sampled_rows:
                probs = processed.softmax(dim=-1)
                current = torch.where(md.temperature < 1e-5, greedy,
                                      random_sample(probs, md.generators))
                qs.append(probs)
            else:
                current = greedy
            proposed.append(current)
        host = torch.stack(proposed, dim=1).tolist()
        q_all = torch.stack(qs, dim=1) if qs else None
        result = {}
        for i, r in enumerate(rows):
            result[r[0]] = host[i][:r[4]]
        if q_all is not None:
            for i in sampled_rows:
                self._q[rows[i][0]] = q_all[i, :rows[i][4]]
        return result
