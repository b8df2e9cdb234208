"""PoolingParams: how one request of a pooling (embedding) model is pooled (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass

# "embed"/"encode": one pooled vector per prompt (the model's pooling type);
# "token_embed": one vector per prompt token.
POOLING_TASKS = ("embed", "encode", "token_embed")


@dataclass
class PoolingParams:
    """Pooling parameters of one request.

    normalize: L2-normalize the output; None keeps the model's default.
    dimensions: keep only the first `dimensions` values (Matryoshka), re-normalized if
        normalizing. Checked against the model's hidden size by `verify`.
    truncate_prompt_tokens: keep only the last k prompt tokens; -1 means the model's maximum
        length; None means no truncation.
    task: one of POOLING_TASKS.
    """

    normalize: bool | None = None
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None
    task: str = "embed"

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(
                f"normalize must be true, false or null, got {self.normalize!r}."
            )
        if self.dimensions is not None:
            if isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int):
                raise ValueError(
                    f"dimensions must be a positive integer, got {self.dimensions!r}."
                )
            if self.dimensions < 1:
                raise ValueError(f"dimensions must be at least 1, got {self.dimensions}.")
        t = self.truncate_prompt_tokens
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(
                    f"truncate_prompt_tokens must be an integer, -1 or null, got {t!r}."
                )
            if t < 1 and t != -1:
                raise ValueError(
                    "truncate_prompt_tokens must be at least 1, or -1 for the model's "
                    f"maximum length, got {t}."
                )
        if self.task not in POOLING_TASKS:
            raise ValueError(
                f"Unknown pooling task {self.task!r}; use one of {', '.join(POOLING_TASKS)}."
            )

    def verify(self, hidden_size: int) -> None:
        """Check the request against the model (its output size); raise ValueError if unfit."""
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(
                f"dimensions={self.dimensions} is larger than the model's embedding size "
                f"({hidden_size}); pass a value from 1 to {hidden_size}."
            )

    def clone(self) -> PoolingParams:
        """A copy that can be changed without affecting this one."""
        return PoolingParams(
            normalize=self.normalize,
            dimensions=self.dimensions,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            task=self.task,
        )
