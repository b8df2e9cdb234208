"""gpt-oss (harmony) channels: ``<|channel|>analysis<|message|>...<|end|>`` is reasoning,
``<|channel|>final<|message|>...`` the answer; ``commentary`` messages (preambles) go to
the answer too. Harmony tool calls (``commentary to=functions.NAME``) are not parsed here.
The markers are special tokens: detokenize with skip_special_tokens=False."""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning.base import ReasoningParser
from pagedllm.entrypoints.openai.tool_parsers.base import split_partial_marker

CHANNEL, MESSAGE = "<|channel|>", "<|message|>"
_MESSAGE_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>", CHANNEL)
_MARKERS = (CHANNEL, MESSAGE, *_MESSAGE_ENDS)


class GptOssReasoningParser(ReasoningParser):
    names = ("gpt_oss", "openai_gptoss")
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        pos = text.find(CHANNEL)
        if pos < 0:  # not harmony-shaped: the whole text is the answer
            return "", text if final else split_partial_marker(text, _MARKERS)[0]
        while pos >= 0:
            header_start = pos + len(CHANNEL)
            body_start = text.find(MESSAGE, header_start)
            if body_start < 0:
                break  # the header is still being written
            channel = text[header_start:body_start].strip().split(" ")[0]
            body_start += len(MESSAGE)
            ends = [i for i in (text.find(m, body_start) for m in _MESSAGE_ENDS) if i >= 0]
            body_end = min(ends) if ends else len(text)
            body = text[body_start:body_end]
            if not ends and not final:
                body = split_partial_marker(body, _MARKERS)[0]
            (reasoning if channel == "analysis" else content).append(body)
            pos = text.find(CHANNEL, body_end)
        return "\n".join(reasoning), "\n".join(content)
