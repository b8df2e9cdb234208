"""What one model-runner step hands back to the engine: sampled tokens and logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LogprobsLists:
    """Logprobs of consecutive positions of one request, on the host.

    Row i is one position: column 0 of `token_ids` / `logprobs` is the position's own token
    (the sampled one, or the next prompt token), columns 1.. are the top-k alternatives,
    most likely first. `ranks[i]` is the own token's rank in the vocabulary (1 = most likely).
    """

    token_ids: np.ndarray  # [P, 1 + k] int64
    logprobs: np.ndarray  # [P, 1 + k] float32
    ranks: np.ndarray  # [P] int64
    start: int = 0  # prompt logprobs: the prompt position of row 0 (>= 1)

    def __len__(self) -> int:
        return len(self.ranks)

    def head(self, num: int) -> LogprobsLists:
        """The first `num` positions."""
        return LogprobsLists(self.token_ids[:num], self.logprobs[:num], self.ranks[:num],
                             self.start)


@dataclass
class ModelRunnerOutput:
    """Request id -> its sampled tokens (a list: one, or with speculative decoding the
    accepted draft tokens and one more), plus logprobs for the requests that asked for them.

    `sampled` also holds the first token of each child forked off an n > 1 parent this step.
    """

    sampled: dict[str, list[int]]
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # A draft model's proposals for each request's next step (speculative decoding).
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class GrammarOutput:
    """The grammar bitmask of a step: ``bitmask.host`` row r masks sampled row r, for the
    rows listed (filled on the host while the forward runs)."""

    bitmask: Any  # structured_output.GrammarBitmask
    rows: list[int]
