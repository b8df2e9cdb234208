"""The server side of chat rendering: `--chat-template` loading, and the shared renderer
(`pagedllm.entrypoints.chat_utils`) with its input errors as 400s."""

from __future__ import annotations

import os
from typing import Any

from pagedllm.entrypoints.chat_utils import ChatInputError, to_conversation
from pagedllm.entrypoints.chat_utils import render_chat as shared_render_chat
from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import ChatMessage


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


def message_text(message: ChatMessage) -> str:
    """The text of one message (text parts joined by newlines, as the renderer joins them)."""
    try:
        return to_conversation([message])[0]["content"]
    except ChatInputError as e:
        raise BadRequestError(str(e), param=e.param) from e


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
    """Prompt text of a chat request through the shared renderer; bad input becomes a 400
    naming the field.

    `chat_template` is the request's or the server's (`--chat-template`) template text;
    without one the tokenizer's own template is used.
    """
    try:
        return shared_render_chat(
            tokenizer, messages, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools,
            documents=documents, chat_template_kwargs=chat_template_kwargs, tokenize=False)
    except ChatInputError as e:
        raise BadRequestError(str(e), param=e.param) from e
