"""The xgrammar backend (optional extra: pip install 'pagedllm[xgrammar]')."""

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

# String formats xgrammar's JSON-schema converter enforces (it ignores others). Its ipv4 takes
# leading zeros ("01.2.3.4"), which JSON Schema's ipv4 rejects: ipv4 goes to guidance under
# "auto". Dates are approximate in both backends (xgrammar takes "2020-02-31", llguidance
# "2021-02-29").
_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})


def _xgr() -> Any:
    require_backend("xgrammar")
    import xgrammar

    return xgrammar


def unsupported_schema_feature(schema: Any) -> str | None:
    """The first keyword of ``schema`` that xgrammar would silently drop, or None.

    xgrammar ignores or loosens these rather than refusing them, so output could break the
    schema: multipleOf, uniqueItems / contains, a string format it does not enforce, a length
    bound next to a pattern or format, patternProperties next to properties.
    """
    if isinstance(schema, list):
        return next(filter(None, map(unsupported_schema_feature, schema)), None)
    if not isinstance(schema, dict):
        return None
    types = schema.get("type")
    types = {types} if isinstance(types, str) else set(types or ())
    if types & {"integer", "number"} and "multipleOf" in schema:
        return "multipleOf"
    if "array" in types:
        for key in ("uniqueItems", "contains", "minContains", "maxContains"):
            if key in schema:
                return key
    if "string" in types:
        fmt = schema.get("format")
        if fmt is not None and fmt not in _FORMATS:
            return f"format {fmt!r}"
        if ("pattern" in schema or fmt is not None) and (
                "minLength" in schema or "maxLength" in schema):
            return "minLength/maxLength together with pattern or format"
    if "patternProperties" in schema and ("properties" in schema
                                          or len(schema["patternProperties"]) > 1):
        return "patternProperties together with properties"
    return next(filter(None, map(unsupported_schema_feature, schema.values())), None)


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices``."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _is_ebnf(grammar: str) -> bool:
    """EBNF / GBNF rules use "::="; anything else is taken as Lark."""
    return "::=" in grammar


def _structural_tag_args(spec: str) -> tuple[tuple, dict]:
    xgr = _xgr()
    tag = json.loads(spec)
    if "structures" in tag:  # the older {"structures": [...], "triggers": [...]} format
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]),
                                       end=s["end"]) for s in tag["structures"]]
        return (items, tag["triggers"]), {}
    return (spec,), {}


def _check(what: str, build: Any) -> None:
    try:
        build()
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"Invalid {what} (xgrammar): {e}") from e


def validate_xgrammar(params: StructuredOutputsParams) -> None:
    """Raise ValueError (xgrammar's own diagnosis) unless xgrammar takes ``params``."""
    xgr = _xgr()
    kind = params.kind
    if params.whitespace_pattern is not None:
        raise ValueError("structured_outputs.whitespace_pattern needs the guidance backend.")
    if kind is StructuredOutputKind.JSON:
        feature = unsupported_schema_feature(params.json)
        if feature:
            raise ValueError(f"The JSON schema uses {feature}, which the xgrammar backend "
                             "does not enforce; use the guidance backend.")
        _check("JSON schema", lambda: xgr.Grammar.from_json_schema(json.dumps(params.json)))
    elif kind is StructuredOutputKind.REGEX:
        _check("regex", lambda: xgr.Grammar.from_regex(params.regex))
    elif kind is StructuredOutputKind.CHOICE:
        _check("choice", lambda: xgr.Grammar.from_ebnf(choice_ebnf(params.choice)))
    elif kind is StructuredOutputKind.GRAMMAR:
        build = xgr.Grammar.from_ebnf if _is_ebnf(params.grammar) else xgr.Grammar.from_lark
        _check("grammar", lambda: build(params.grammar))
    elif kind is StructuredOutputKind.STRUCTURAL_TAG:
        def build() -> None:
            args, kwargs = _structural_tag_args(params.structural_tag)
            xgr.Grammar.from_structural_tag(*args, **kwargs)
        _check("structural_tag", build)


class XgrammarGrammar(StructuredOutputGrammar):
    """A request's xgrammar GrammarMatcher."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self._terminated = False

    def accept_tokens(self, tokens: Sequence[int]) -> bool:
        for token in tokens:
            if self._terminated:
                return True
            if not self.matcher.accept_token(int(token)):
                return False
            self._terminated = self.matcher.is_terminated()
        return True

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        accepted = 0
        for token in tokens:
            if self.matcher.is_terminated() or not self.matcher.accept_token(int(token)):
                break
            accepted += 1
        if accepted:
            self.matcher.rollback(accepted)
        return accepted

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self._terminated = self.matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._terminated

    def reset(self) -> None:
        self.matcher.reset()
        self._terminated = False


class XgrammarBackend(StructuredOutputBackend):
    """xgrammar bound to one tokenizer; compiled grammars are xgrammar CompiledGrammars."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 disable_any_whitespace: bool = False, max_rollback_tokens: int = 0,
                 fill_threads: int | None = None) -> None:
        xgr = _xgr()
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        threads = fill_threads or max(1, min(8, os.cpu_count() or 1))
        # Our manager caches compiled grammars by spec; xgrammar's own cache would be a second.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads,
                                            cache_enabled=False)
        self.batch_matcher = xgr.BatchGrammarMatcher(threads)
        self.disable_any_whitespace = disable_any_whitespace
        self.max_rollback_tokens = max_rollback_tokens

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        c = self.compiler
        try:
            if kind in (StructuredOutputKind.JSON, StructuredOutputKind.JSON_OBJECT):
                compact = self.disable_any_whitespace or params.disable_any_whitespace
                return c.compile_json_schema(json.dumps(params.schema), any_whitespace=not compact,
                                             separators=(",", ":") if compact else None)
            if kind is StructuredOutputKind.REGEX:
                return c.compile_regex(params.regex)
            if kind is StructuredOutputKind.CHOICE:
                return c.compile_grammar(choice_ebnf(params.choice))
            if kind is StructuredOutputKind.GRAMMAR:
                if _is_ebnf(params.grammar):
                    return c.compile_grammar(params.grammar)
                return c.compile_lark(params.grammar)
            args, kwargs = _structural_tag_args(params.structural_tag)
            return c.compile_structural_tag(*args, **kwargs)
        except (RuntimeError, TypeError, KeyError) as e:
            raise ValueError(f"Invalid {kind.value} (xgrammar): {e}") from e

    def new_grammar(self, compiled: Any) -> XgrammarGrammar:
        xgr = _xgr()
        return XgrammarGrammar(xgr.GrammarMatcher(
            compiled, max_rollback_tokens=self.max_rollback_tokens))

    def fill_bitmask_batch(self, grammars: Sequence[tuple[StructuredOutputGrammar, int]],
                           bitmask: torch.Tensor) -> None:
        matchers = [g.matcher for g, _ in grammars]  # type: ignore[attr-defined]
        self.batch_matcher.batch_fill_next_token_bitmask(
            matchers, bitmask, [row for _, row in grammars])
