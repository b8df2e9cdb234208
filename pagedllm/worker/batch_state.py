"""The model runner's persistent per-request state, updated as requests join and leave.

A request joins with `SchedulerOutput.new_requests` (its tokens, params and blocks in full)
and leaves when it finishes or is preempted. In between, each step only adds its new KV
blocks, and the runner appends the tokens it sampled. Sampling parameters live in slot
arrays written once when a request joins, so a step gathers them by slot instead of reading
every request's params again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from pagedllm.engine.scheduler import NewRequestData
from pagedllm.sampling_params import SamplingParams, SamplingType
from pagedllm.utils import to_device_async
from pagedllm.worker.sampler import SamplingMetadata

_EPS = 1e-5


class RequestState:
    """One request as the runner holds it (attribute names as on the engine's Request, so
    the logits processors read either)."""

    __slots__ = ("request_id", "all_token_ids", "num_prompt_tokens", "sampling_params",
                 "eos_token_id", "blocks", "num_blocks", "slot", "wants_logprobs",
                 "wants_prompt_logprobs")

    def __init__(self, data: NewRequestData, slot: int) -> None:
        self.request_id = data.request_id
        self.all_token_ids = data.token_ids
        self.num_prompt_tokens = data.num_prompt_tokens
        self.sampling_params = data.sampling_params
        self.eos_token_id = data.eos_token_id
        n = len(data.block_ids)
        self.blocks = np.empty(max(2 * n, 16), dtype=np.int32)
        self.blocks[:n] = data.block_ids
        self.num_blocks = n
        self.slot = slot
        p = data.sampling_params
        self.wants_logprobs = p.wants_logprobs
        self.wants_prompt_logprobs = p.prompt_logprobs is not None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    def add_blocks(self, block_ids: Sequence[int]) -> None:
        n = self.num_blocks + len(block_ids)
        if n > len(self.blocks):
            grown = np.empty(2 * n, dtype=np.int32)
            grown[:self.num_blocks] = self.blocks[:self.num_blocks]
            self.blocks = grown
        self.blocks[self.num_blocks:n] = block_ids
        self.num_blocks = n

    @property
    def block_row(self) -> np.ndarray:
        return self.blocks[:self.num_blocks]


class BatchState:
    """Every request the runner holds, with their sampling parameters in slot arrays."""

    def __init__(self, vocab_size: int, capacity: int = 256) -> None:
        self.vocab_size = vocab_size
        self.requests: dict[str, RequestState] = {}
        self.temperature = np.zeros(capacity, dtype=np.float32)
        self.top_k = np.full(capacity, vocab_size, dtype=np.int64)
        self.top_p = np.ones(capacity, dtype=np.float32)
        self.min_p = np.zeros(capacity, dtype=np.float32)
        self._free_slots = list(range(capacity - 1, -1, -1))

    def add(self, data: NewRequestData) -> None:
        old = self.requests.pop(data.request_id, None)
        slot = old.slot if old is not None else self._take_slot()
        p = data.sampling_params
        self.temperature[slot] = p.temperature
        self.top_k[slot] = p.top_k if p.top_k > 0 else self.vocab_size
        self.top_p[slot] = p.top_p
        self.min_p[slot] = p.min_p
        self.requests[data.request_id] = RequestState(data, slot)

    def remove(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            state = self.requests.pop(rid, None)
            if state is not None:
                self._free_slots.append(state.slot)

    def _take_slot(self) -> int:
        if not self._free_slots:
            old = len(self.temperature)
            self.temperature = np.concatenate([self.temperature, np.zeros(old, np.float32)])
            self.top_k = np.concatenate([self.top_k, np.full(old, self.vocab_size, np.int64)])
            self.top_p = np.concatenate([self.top_p, np.ones(old, np.float32)])
            self.min_p = np.concatenate([self.min_p, np.zeros(old, np.float32)])
            self._free_slots = list(range(2 * old - 1, old - 1, -1))
        return self._free_slots.pop()

    def sampling_metadata(self, slots: np.ndarray, params: Sequence[SamplingParams],
                          generators: dict[int, torch.Generator],
                          device: torch.device) -> SamplingMetadata:
        """The sampling tensors of rows whose parameters sit in ``slots`` (-1: a row whose
        parameters come from ``params`` only, e.g. a forked sample)."""
        temperature = self.temperature[slots]
        top_k, top_p, min_p = self.top_k[slots], self.top_p[slots], self.min_p[slots]
        extra = np.flatnonzero(slots < 0)
        for i in extra:
            p = params[i]
            temperature[i], top_p[i], min_p[i] = p.temperature, p.top_p, p.min_p
            top_k[i] = p.top_k if p.top_k > 0 else self.vocab_size

        return SamplingMetadata(
            to_device_async(temperature, device),
            to_device_async(top_k, device) if (top_k < self.vocab_size).any() else None,
            to_device_async(top_p, device) if (top_p < 1.0).any() else None,
            to_device_async(min_p, device) if (min_p > 0.0).any() else None,
            not (temperature >= _EPS).any(), generators)


def seeded(params: SamplingParams) -> bool:
    return params.seed is not None and params.sampling_type != SamplingType.GREEDY
