"""SamplingParams: how one request samples and when it stops (vLLM's names and ranges)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pagedllm.structured_output.params import StructuredOutputsParams

_SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output holds all text and tokens so far
    DELTA = 1  # every output holds only what is new since the last one
    FINAL_ONLY = 2  # only the finished output is returned


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    Defaults follow vLLM: temperature 1.0, top_p 1.0, top_k 0 (off), max_tokens 16.
    Every field is checked at construction; a bad value raises ValueError saying how to fix it.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine: token ids of bad_words, the EOS id(s) of the tokenizer, the
    # structured-outputs backend that validated `structured_outputs`.
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    _structured_outputs_backend: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(
                    "logit_bias must map token ids to floats, e.g. {50256: -100}."
                ) from e
        self._verify()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the other knobs have no effect.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    # ------------------------------------------------------------------ checks
    def _verify(self) -> None:
        _int("n", self.n, 1)
        _int("best_of", self.best_of, 1)
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n}).")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        if _float("repetition_penalty", self.repetition_penalty) <= 0.0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1.0 means off), got {self.repetition_penalty}."
            )
        if _float("temperature", self.temperature) < 0.0:
            raise ValueError(
                f"temperature must be >= 0 (0 means greedy), got {self.temperature}."
            )
        if not 0.0 < _float("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _int("top_k", self.top_k, -1)
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= _float("min_p", self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None:
            _int("seed", self.seed, None)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1)
        _int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})."
            )
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, -1)
        if self.prompt_logprobs is not None:
            _int("prompt_logprobs", self.prompt_logprobs, -1)
        if self.truncate_prompt_tokens is not None:
            _int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a string or a list of non-empty strings.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (use stop_token_ids to stop "
                             "on tokens without detokenizing).")
        for tid in self.stop_token_ids:
            _int("stop_token_ids entries", tid, 0)
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty; leave it unset instead.")
            for tid in self.allowed_token_ids:
                _int("allowed_token_ids entries", tid, 0)
        if self.logit_bias is not None:
            for bias in self.logit_bias.values():
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}.")
        if self.bad_words is not None and (
                not isinstance(self.bad_words, list)
                or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            raise ValueError("bad_words must be a list of non-empty strings.")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError("output_kind must be a RequestOutputKind.")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams, e.g. "
                                 "StructuredOutputsParams(json=schema).")

    # --------------------------------------------------------------- helpers
    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def wants_logprobs(self) -> bool:
        """Sample logprobs asked for, or needed to rank best_of > n samples."""
        return self.logprobs is not None or self.best_of > self.n

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    @property
    def bad_words_token_ids(self) -> list[list[int]]:
        """Token ids of bad_words (filled by the engine from its tokenizer)."""
        return self._bad_words_token_ids

    def clone(self) -> SamplingParams:
        import copy

        return copy.deepcopy(self)


def _int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, got NaN.")
    return float(value)
