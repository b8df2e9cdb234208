"""What every reasoning parser shares: the split types, the `ReasoningParser` contract and
the streaming diff.

A parser says how its format reads: `parse(text, final)` gives (reasoning, content) as far
as the text shows them. Both only grow as the text grows (a trailing piece that could be a
marker, and trailing whitespace, are held back until the text is final), so a stream can
send the difference each step and its deltas assemble to what `extract` returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ExtractedReasoning:
    """A whole output split into the thinking part and the answer (None when empty)."""

    reasoning: str | None
    content: str | None


@dataclass(frozen=True)
class ReasoningDelta:
    """What one step of a stream adds to the reasoning and to the answer."""

    reasoning: str | None = None
    content: str | None = None


class ReasoningParser(ABC):
    """One reasoning format. Subclasses set `names` (the ``--reasoning-parser`` values) and
    implement `parse`. An instance serves one request: `prompt` (the rendered prompt text)
    tells whether the template already opened the thinking block."""

    names: ClassVar[tuple[str, ...]] = ()
    # True when the markers are special tokens: detokenize with skip_special_tokens=False.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, tokenizer: Any = None, prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt

    @abstractmethod
    def parse(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of `text`; see the module doc."""

    def extract(self, text: str) -> ExtractedReasoning:
        reasoning, content = self.parse(text, final=True)
        return ExtractedReasoning(reasoning or None, content or None)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """Feed the text deltas of one choice; get reasoning / content deltas back."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.reasoning = ""
        self.content = ""

    def feed(self, delta_text: str, final: bool = False) -> ReasoningDelta | None:
        """Add text; with ``final=True`` the output is complete (held-back text is sent)."""
        self.text += delta_text
        return self._step(final)

    def finish(self) -> ReasoningDelta | None:
        return self._step(final=True)

    def _step(self, final: bool) -> ReasoningDelta | None:
        reasoning, content = self.parser.parse(self.text, final)
        new_reasoning = _grown(self.reasoning, reasoning)
        new_content = _grown(self.content, content)
        if new_reasoning:
            self.reasoning = reasoning
        if new_content:
            self.content = content
        if not (new_reasoning or new_content):
            return None
        return ReasoningDelta(new_reasoning, new_content)


def _grown(old: str, new: str) -> str | None:
    if len(new) > len(old) and new.startswith(old):
        return new[len(old):]
    return None
