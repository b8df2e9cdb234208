"""The llguidance backend ("guidance"; a default dependency: one self-contained wheel)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from pagedllm.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
)
from pagedllm.structured_output.config import require_backend
from pagedllm.structured_output.params import StructuredOutputKind, StructuredOutputsParams


def _llg() -> Any:
    require_backend("guidance")
    import llguidance
    import llguidance.torch  # noqa: F401  (the bitmask helpers)

    return llguidance


def guidance_grammar(params: StructuredOutputsParams, disable_any_whitespace: bool = False
                     ) -> str:
    """``params`` as an llguidance grammar definition (ValueError if it cannot be built)."""
    llg = _llg()
    kind = params.kind
    compact = disable_any_whitespace or params.disable_any_whitespace
    try:
        if kind in (StructuredOutputKind.JSON, StructuredOutputKind.JSON_OBJECT):
            options: dict[str, Any] = {"whitespace_flexible": not compact}
            if params.whitespace_pattern is not None:
                options["whitespace_pattern"] = params.whitespace_pattern
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(params.schema),
                                                          defaults=options)
        if kind is StructuredOutputKind.REGEX:
            return llg.grammar_from("regex", params.regex)
        if kind is StructuredOutputKind.CHOICE:
            return llg.grammar_from("choice", json.dumps(params.choice))
        if kind is StructuredOutputKind.GRAMMAR:
            return llg.grammar_from("grammar", params.grammar)
        # llguidance's structural tags need each trigger to be one special token of the
        # tokenizer, and in our tests it let a tag's body break its schema: refused.
        raise ValueError("structural_tag needs the xgrammar backend (pip install "
                         "'pagedllm[xgrammar]')")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Invalid {kind.value} (guidance): {e}") from e


def validate_guidance(params: StructuredOutputsParams) -> None:
    """Raise ValueError (llguidance's own diagnosis) unless llguidance takes ``params``."""
    grammar = guidance_grammar(params)
    error = _llg().LLMatcher.validate_grammar(grammar, None)
    if error:
        raise ValueError(f"Invalid {params.kind.value} (guidance): {error}")


class GuidanceGrammar(StructuredOutputGrammar):
    """A request's llguidance LLMatcher."""

    def __init__(self, matcher: Any, eos_token_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self._eos = eos_token_ids
        self._terminated = False
        # A stop token consumed by a matcher already stopped leaves no state to roll back.
        self._lag = 0

    def accept_tokens(self, tokens: Sequence[int]) -> bool:
        for token in tokens:
            if self._terminated:
                return True
            if int(token) in self._eos and self.matcher.is_stopped():
                self._terminated, self._lag = True, 1
                continue
            if not self.matcher.consume_token(int(token)):
                return False
            if int(token) in self._eos:
                self._terminated = True
        return True

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        if self._terminated or not tokens:
            return 0
        return self.matcher.validate_tokens([int(t) for t in tokens])

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            if num_tokens > self._lag:
                self.matcher.rollback(num_tokens - self._lag)
            self._terminated, self._lag = False, 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        # A stopped matcher (grammar complete, no continuation) allows only the stop tokens.
        _llg().torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._terminated

    def reset(self) -> None:
        self.matcher.reset()
        self._terminated, self._lag = False, 0


class GuidanceBackend(StructuredOutputBackend):
    """llguidance bound to one tokenizer; compiled grammars are template LLMatchers."""

    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 disable_any_whitespace: bool = False, fill_threads: int | None = None
                 ) -> None:
        llg = _llg()
        import llguidance.hf

        self.eos_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=list(self.eos_token_ids))
        self.executor = llg.LLExecutor(fill_threads or max(1, min(8, os.cpu_count() or 1)))
        self.disable_any_whitespace = disable_any_whitespace

    def compile(self, params: StructuredOutputsParams) -> Any:
        grammar = guidance_grammar(params, self.disable_any_whitespace)
        matcher = _llg().LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"Invalid {params.kind.value} (guidance): {matcher.get_error()}")
        return matcher

    def new_grammar(self, compiled: Any) -> GuidanceGrammar:
        return GuidanceGrammar(compiled.deep_copy(), self.eos_token_ids)

    def fill_bitmask_batch(self, grammars: Sequence[tuple[StructuredOutputGrammar, int]],
                           bitmask: torch.Tensor) -> None:
        _llg().torch.fill_next_token_bitmask_par(
            self.executor, [(g.matcher, row) for g, row in grammars],  # type: ignore[attr-defined]
            bitmask)
