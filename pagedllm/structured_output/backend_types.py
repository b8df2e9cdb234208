"""What a grammar backend provides: compiled grammars and one matcher per request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from pagedllm.structured_output.params import StructuredOutputsParams


class StructuredOutputGrammar(ABC):
    """One request's position in its grammar.

    The engine feeds it every sampled token (``accept_tokens``); before each sampling step it
    writes the allowed next tokens into a bitmask row (``fill_bitmask``). ``rollback`` undoes
    tokens (rejected draft tokens of speculative decoding). ``is_terminated`` is true once the
    grammar has accepted a stop token: the request then ends with finish reason "stop". When
    the grammar is complete and allows no continuation, the bitmask allows only stop tokens.
    """

    @abstractmethod
    def accept_tokens(self, tokens: Sequence[int]) -> bool:
        """Advance by ``tokens``; False (state unchanged past the bad token) if one is not
        allowed. Tokens after termination are ignored."""

    @abstractmethod
    def validate_tokens(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the grammar would accept, without advancing."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (at most ``max_rollback_tokens``)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 on the host)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether a stop token was accepted (the constrained output is complete)."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the start of the grammar (a preempted request that recomputes)."""

    def fill_bitmasks(self, bitmask: torch.Tensor, row: int,
                      draft_tokens: Sequence[int] = ()) -> int:
        """Fill ``1 + len(draft_tokens)`` rows from ``row``: the mask before each draft token
        and after the last. Rows after a draft token the grammar rejects, or after a stop
        token, allow everything (that token is rejected, or the request ends there). The
        state is left as it was. Returns rows filled."""
        self.fill_bitmask(bitmask, row)
        accepted = 0
        for i, token in enumerate(draft_tokens, start=1):
            if not self.accept_tokens([token]):
                bitmask[row + i:row + 1 + len(draft_tokens)] = -1
                break
            accepted += 1
            if self.is_terminated():  # a stop token: the request ends there if accepted
                bitmask[row + i:row + 1 + len(draft_tokens)] = -1
                break
            self.fill_bitmask(bitmask, row + i)
        if accepted:
            self.rollback(accepted)
        return 1 + len(draft_tokens)


class StructuredOutputBackend(ABC):
    """A grammar library bound to one tokenizer (its token table built once, at construction).

    ``compile`` is thread-safe and runs on the manager's compile threads; ``new_grammar``
    makes a request's matcher from a compiled (cached) grammar.
    """

    name: str

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compile ``params``' constraint (ValueError with the backend's diagnosis)."""

    @abstractmethod
    def new_grammar(self, compiled: Any) -> StructuredOutputGrammar:
        """A fresh matcher at the start of ``compiled``."""

    def fill_bitmask_batch(self, grammars: Sequence[tuple[StructuredOutputGrammar, int]],
                           bitmask: torch.Tensor) -> None:
        """Fill each grammar's row (backends override this with their parallel fill)."""
        for grammar, row in grammars:
            grammar.fill_bitmask(bitmask, row)
