"""``<think>...</think>`` reasoning (Qwen3, DeepSeek-R1 and their kind).

The thinking part is the text inside the block; the answer is what follows ``</think>``.
A block left open (output cut at max_tokens) is all reasoning. Whitespace around both
parts is dropped.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning.base import ReasoningParser
from pagedllm.entrypoints.openai.tool_parsers.base import split_partial_marker

THINK_START, THINK_END = "<think>", "</think>"


class ThinkReasoningParser(ReasoningParser):
    """Base for `<think>` formats; `starts_in_reasoning` says whether the output begins
    inside the block (the template opened it) even without a ``<think>`` of its own."""

    start, end = THINK_START, THINK_END

    def starts_in_reasoning(self) -> bool:
        """Whether the prompt ends inside an open thinking block."""
        prompt = self.prompt or ""
        return prompt.rfind(self.start) > prompt.rfind(self.end)

    def parse(self, text: str, final: bool) -> tuple[str, str]:
        body = text.lstrip()
        if body.startswith(self.start):
            body = body[len(self.start):]
        elif not final and self.start.startswith(body):
            return "", ""  # nothing but (part of) the opening tag so far
        elif not self.starts_in_reasoning():
            return "", text if final else text.rstrip()
        close = body.find(self.end)
        if close < 0:
            reasoning = body if final else split_partial_marker(body, [self.end])[0]
            return reasoning.strip(), ""
        content = body[close + len(self.end):].lstrip()
        return body[:close].strip(), content if final else content.rstrip()


class Qwen3ReasoningParser(ThinkReasoningParser):
    """Qwen3: thinks when it writes ``<think>`` or when the template opened the block
    (thinking-only models); with ``enable_thinking=False`` the template closes an empty
    block in the prompt, and the output is all answer."""

    names = ("qwen3",)


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    """DeepSeek-R1: always starts by thinking (its template may or may not write the
    ``<think>``), so text before ``</think>`` is reasoning."""

    names = ("deepseek_r1",)

    def starts_in_reasoning(self) -> bool:
        return True
