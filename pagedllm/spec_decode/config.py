"""`speculative_config`: what the user asks for, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pagedllm.utils import config_dict

METHODS = ("ngram", "draft_model")
# Methods vLLM knows that pagedllm does not implement: refused by name.
NOT_IMPLEMENTED = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "suffix",
                   "deepseek_mtp")
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_PROMPT_LOOKUP_MAX = 5


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate: `method` "ngram" (prompt lookup in the request's own tokens) or
    "draft_model" (a smaller model sharing the target's tokenizer), proposing
    `num_speculative_tokens` tokens per step for the target to verify.

    For "ngram", the last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`)
    are looked up in the request's earlier tokens; the tokens that followed their most
    recent earlier occurrence are the proposal. With neither bound given the lookup spans
    1 to 5 tokens; with one given, the other bound is 1 (min) or equal to it (max).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    # Where the draft runs: the target's device type only (it shares the target's process,
    # block manager and block ids). Any other device type is refused.
    device: str | None = None

    def __post_init__(self) -> None:
        if self.method in NOT_IMPLEMENTED:
            raise ValueError(f"speculative_config method {self.method!r} is not supported by "
                             f"pagedllm; use one of {', '.join(METHODS)}.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown speculative_config method {self.method!r}; use one of "
                             f"{', '.join(METHODS)}.")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError("speculative_config num_speculative_tokens must be an integer "
                             f"from 1 to {MAX_SPECULATIVE_TOKENS} (got {k!r}).")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"speculative_config device must be a string (got {self.device!r}).")
        if self.method == "ngram":
            if self.model is not None or self.device is not None:
                raise ValueError("speculative_config: method 'ngram' takes no 'model' or "
                                 "'device'; drop them, or use method 'draft_model'.")
            for name in ("prompt_lookup_max", "prompt_lookup_min"):
                value = getattr(self, name)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or value < 1):
                    raise ValueError(f"speculative_config {name} must be an integer >= 1 "
                                     f"(got {value!r}).")
            lo, hi = self.lookup_range
            if lo > hi:
                raise ValueError(f"speculative_config prompt_lookup_min ({lo}) must not exceed "
                                 f"prompt_lookup_max ({hi}).")
        else:
            if not self.model or not isinstance(self.model, str):
                raise ValueError("speculative_config method 'draft_model' needs 'model': the "
                                 "draft model's path or hub id.")
            for name in ("prompt_lookup_max", "prompt_lookup_min"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config {name} applies to method 'ngram' "
                                     "only; drop it.")

    @property
    def lookup_range(self) -> tuple[int, int]:
        """(min, max) n-gram length of the prompt lookup."""
        lo = self.prompt_lookup_min if self.prompt_lookup_min is not None else 1
        if self.prompt_lookup_max is not None:
            return lo, self.prompt_lookup_max
        return lo, (lo if self.prompt_lookup_min is not None else DEFAULT_PROMPT_LOOKUP_MAX)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str) -> SpeculativeConfig:
        """From a dict (`LLM(speculative_config=...)`) or its JSON text (the CLI flag).
        The method defaults to "draft_model" when a model is named, as in vLLM."""
        if isinstance(value, SpeculativeConfig):
            return value
        data = config_dict(value, "speculative_config", "--speculative-config",
                           '{"method": "ngram", "num_speculative_tokens": 4}',
                           [f.name for f in fields(cls)])
        if "method" not in data:
            if data.get("model") is None:
                raise ValueError("speculative_config needs 'method' (\"ngram\") or 'model' "
                                 "(a draft model).")
            data["method"] = "draft_model"
        if "num_speculative_tokens" not in data:
            raise ValueError("speculative_config needs 'num_speculative_tokens'.")
        return cls(**data)
