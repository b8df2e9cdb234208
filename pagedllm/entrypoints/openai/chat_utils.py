"""Chat messages -> prompt text through the chat template (tokenizer.apply_chat_template)."""

from __future__ import annotations

import os
from typing import Any

from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import ChatMessage

# Keyword arguments of apply_chat_template a request may not override via chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tokenize", "return_dict", "return_tensors", "tokenizer_kwargs",
    "chat_template", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "padding", "truncation", "max_length", "return_assistant_tokens_mask",
})


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a path to a Jinja file, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    looks_like_path = "{" not in value and (
        os.sep in value or value.endswith((".jinja", ".j2", ".jinja2", ".txt")))
    if looks_like_path:
        raise ValueError(f"--chat-template {value!r}: no such file. Pass a path to a Jinja "
                         "template file or the template text itself.")
    return value


def to_conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the template; content parts must be text."""
    conversation: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type not in ("text", "input_text") or part.text is None:
                    raise BadRequestError(
                        f"messages[{i}].content: only text parts are supported, got a "
                        f"{part.type!r} part.", param=f"messages.{i}.content")
                texts.append(part.text)
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(message, key)
            if value is not None:
                entry[key] = value
        conversation.append(entry)
    return conversation


def message_text(message: ChatMessage) -> str:
    """The text of one message (text parts joined by newlines)."""
    return to_conversation([message])[0]["content"]


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    chat_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, str]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """Render the conversation to prompt text; template problems become 400s.

    `chat_template` is the request's or the server's (`--chat-template`) template; without
    one the tokenizer's own template is used.
    """
    if not messages:
        raise BadRequestError("messages must not be empty.", param="messages")
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise BadRequestError(
            "This model has no chat template, so chat completions cannot be rendered. Start "
            "the server with --chat-template <file> or use /v1/completions.", param="messages")
    if continue_final_message and messages[-1].role != "assistant":
        raise BadRequestError("continue_final_message needs the last message to be from the "
                              "assistant.", param="continue_final_message")
    extra = {k: v for k, v in (chat_template_kwargs or {}).items()
             if k not in _RESERVED_TEMPLATE_KWARGS}
    try:
        text = tokenizer.apply_chat_template(
            to_conversation(messages),
            chat_template=chat_template or None,  # None: the tokenizer's own template(s)
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **extra,
        )
    except BadRequestError:
        raise
    except Exception as e:  # jinja2 errors, raise_exception() in templates, bad kwargs
        raise BadRequestError(f"Could not apply the chat template: {e}",
                              param="messages") from e
    if not isinstance(text, str):
        raise BadRequestError("The chat template did not render to text.", param="messages")
    return text
