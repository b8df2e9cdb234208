"""StructuredOutputManager: one per engine; compiles grammars off the step loop, caches them by
spec, and fills the step's bitmask for the constrained requests."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pagedllm.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
)
from pagedllm.structured_output.bitmask import GrammarBitmask
from pagedllm.structured_output.config import BackendName, StructuredOutputsConfig
from pagedllm.structured_output.params import StructuredOutputsParams
from pagedllm.structured_output.validation import validate_structured_outputs


class StructuredOutputRequest:
    """A request's constraint: its compile (a Future, never waited on by the step loop) and,
    once that is done, its own grammar matcher."""

    def __init__(self, params: StructuredOutputsParams, compiled: Future) -> None:
        self.params = params
        self._compiled = compiled  # -> (compiled grammar, its backend)
        self._grammar: StructuredOutputGrammar | None = None

    def is_ready(self) -> bool:
        """Whether the grammar is compiled (True also when compiling failed: see ``error``).
        The scheduler keeps a request that is not ready waiting and schedules the others."""
        return self._compiled.done()

    @property
    def error(self) -> BaseException | None:
        """The compile's ValueError (the backend's diagnosis) once it failed, else None."""
        return self._compiled.exception() if self._compiled.done() else None

    @property
    def grammar(self) -> StructuredOutputGrammar:
        """The request's matcher (made on first use). Only call once ``is_ready()``."""
        if self._grammar is None:
            if not self._compiled.done():
                raise RuntimeError("the grammar is still compiling: check is_ready() first")
            compiled, backend = self._compiled.result()
            self._grammar = backend.new_grammar(compiled)
        return self._grammar

    @property
    def backend(self) -> StructuredOutputBackend:
        """The backend that compiled the grammar. Only call once ``is_ready()``."""
        return self._compiled.result(0)[1]

    def wait(self, timeout: float | None = None) -> StructuredOutputGrammar:
        """Block until compiled (offline use and tests); re-raises the compile error."""
        self._compiled.result(timeout)
        return self.grammar

    # The engine's side of the "ends" rule.
    def accept_tokens(self, tokens: Sequence[int]) -> bool:
        return self.grammar.accept_tokens(tokens)

    def is_terminated(self) -> bool:
        """True once the grammar accepted a stop token: finish the request with "stop"."""
        return self._grammar is not None and self._grammar.is_terminated()


class StructuredOutputManager:
    """Grammar compilation and bitmasks for one engine and one tokenizer.

    Each backend's token table is built once, by the first compile that needs it (on a
    compile thread). ``grammar_init`` validates a request and starts its compile (or takes
    it from the cache by spec); ``fill_bitmask`` and ``apply_bitmask`` run each step.
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 config: StructuredOutputsConfig | None = None, *,
                 stop_token_ids: Sequence[int] | None = None, max_rows: int = 256,
                 max_rollback_tokens: int = 0, device: torch.device | str = "cpu") -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size or len(tokenizer))
        if self.vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size ({self.vocab_size}) is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens.")
        self.config = config or StructuredOutputsConfig()
        if stop_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("The tokenizer has no EOS token: pass stop_token_ids.")
            stop_token_ids = [tokenizer.eos_token_id]
        self.stop_token_ids = list(stop_token_ids)
        self.max_rollback_tokens = max_rollback_tokens
        self.bitmask = GrammarBitmask(max_rows, self.vocab_size, device)
        self._executor = ThreadPoolExecutor(self.config.compile_workers,
                                            thread_name_prefix="pagedllm-grammar")
        self._lock = threading.Lock()  # the cache
        self._build_lock = threading.Lock()  # the backends
        self._backends: dict[str, StructuredOutputBackend] = {}
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ compile
    def grammar_init(self, params: StructuredOutputsParams,
                     backend: BackendName | None = None) -> StructuredOutputRequest:
        """Start ``params``' compile off this thread; ValueError now if it is invalid.

        ``backend`` is the one ``validate_structured_outputs`` chose at the front end (it is
        validated and chosen here when None).
        """
        if backend is None:
            backend = validate_structured_outputs(params, self.config)
        key = (backend, params.kind, params.spec,
               params.disable_any_whitespace or self.config.disable_any_whitespace,
               params.whitespace_pattern)
        with self._lock:
            future = self._cache.get(key)
            new = future is None
            if new:
                self.cache_misses += 1
                future = self._executor.submit(self._compile, backend, params)
                self._cache[key] = future
                while len(self._cache) > self.config.grammar_cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
                self.cache_hits += 1
        if new:  # outside the lock: a compile already done runs the callback right here
            future.add_done_callback(lambda f, k=key: self._forget_failed(k, f))
        return StructuredOutputRequest(params, future)

    def _compile(self, backend: str, params: StructuredOutputsParams
                 ) -> tuple[Any, StructuredOutputBackend]:
        impl = self._backend(backend)
        return impl.compile(params), impl

    def _forget_failed(self, key: tuple, future: Future) -> None:
        if future.exception() is not None:
            with self._lock:
                if self._cache.get(key) is future:
                    del self._cache[key]

    def _backend(self, name: str) -> StructuredOutputBackend:
        # Only compile threads wait on this lock (a token table takes seconds to build, the
        # masking kernel's compile a second); the step loop never takes it.
        with self._build_lock:
            if name not in self._backends:
                if not self._backends:  # the first constrained request waits for this too
                    self.bitmask.warm_up()
                self._backends[name] = self._build_backend(name)
            return self._backends[name]

    def _build_backend(self, name: str) -> StructuredOutputBackend:
        common = dict(tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                      stop_token_ids=self.stop_token_ids,
                      disable_any_whitespace=self.config.disable_any_whitespace)
        if name == "xgrammar":
            from pagedllm.structured_output.backend_xgrammar import XgrammarBackend

            return XgrammarBackend(**common, max_rollback_tokens=self.max_rollback_tokens)
        from pagedllm.structured_output.backend_guidance import GuidanceBackend

        return GuidanceBackend(**common)

    @property
    def num_cached(self) -> int:
        with self._lock:
            return len(self._cache)

    # ------------------------------------------------------------------ per step
    def fill_bitmask(self, rows: Sequence[tuple[Any, ...]]) -> list[int]:
        """Fill ``self.bitmask.host`` row r for each (request, r) or (request, r, drafts);
        returns the rows filled. With draft tokens (speculative decoding) rows r .. r + K
        mask each verified position: before each draft token and after the last.

        Requests whose grammar is terminated get no row (their logits stay as they are).
        Each backend fills its requests' rows without drafts in one parallel call.
        """
        self.bitmask.wait_copied()
        by_backend: dict[int, tuple[StructuredOutputBackend, list]] = {}
        filled: list[int] = []
        for request, row, *rest in rows:
            grammar = request.grammar
            if grammar.is_terminated():
                continue
            drafts = rest[0] if rest else ()
            if drafts:
                num = grammar.fill_bitmasks(self.bitmask.host, row, drafts)
                filled.extend(range(row, row + num))
                continue
            impl = request.backend
            by_backend.setdefault(id(impl), (impl, []))[1].append((grammar, row))
        for impl, entries in by_backend.values():
            impl.fill_bitmask_batch(entries, self.bitmask.host)
            filled.extend(row for _, row in entries)
        return sorted(filled)

    def apply_bitmask(self, logits: torch.Tensor, rows: Sequence[int]) -> None:
        """Mask ``logits`` (on the device) with the rows ``fill_bitmask`` filled."""
        self.bitmask.apply(logits, rows)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
