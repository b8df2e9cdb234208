"""The host-side inputs of one model step: what every tensor-parallel rank needs to run it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepInputs:
    """One step's flat batch as numpy arrays (cheap to pickle and send to other ranks).

    Tokens of all scheduled requests are laid out back to back; request i owns tokens
    query_start_loc[i]:query_start_loc[i + 1].
    """

    token_ids: np.ndarray  # int64 [num_tokens]
    positions: np.ndarray  # int64 [num_tokens]
    query_start_loc: np.ndarray  # int32 [num_reqs + 1]
    seq_lens: np.ndarray  # int32 [num_reqs]: tokens in the KV cache after this step
    block_table: np.ndarray  # int32 [num_reqs, max_blocks]
    slot_mapping: np.ndarray  # int64 [num_tokens]: KV cache slot of each new token
    sample_rows: list[int]  # token rows whose logits are sampled (last token of a request)
    prompt_rows: list[int] = field(default_factory=list)  # rows scored for prompt logprobs
    # Async scheduling: token rows whose id is still on the device (dst), taken from the
    # previous step's sampled ids (src); and whether rank 0 broadcasts this step's sampled
    # ids to the other ranks (for the next step's pending tokens).
    pending_dst: list[int] = field(default_factory=list)
    pending_src: list[int] = field(default_factory=list)
    shares_sampled: bool = False
    num_sampled: int = 0  # sampled rows, forked samples included (the broadcast's length)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
