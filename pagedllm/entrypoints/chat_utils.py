"""Rendering chat conversations through the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

from pagedllm.engine.input_processor import read_chat_template

_ROLES = ("system", "user", "assistant", "tool", "developer")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'.")
        if m["role"] not in _ROLES:
            raise ValueError(
                f"messages[{i}].role is {m['role']!r}; use one of {', '.join(_ROLES)}."
            )
    return messages


def _flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI content parts [{'type': 'text', 'text': ...}] become plain strings."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError("Only text content parts are supported.")
                texts.append(part.get("text", ""))
            m = {**m, "content": "".join(texts)}
        elif content is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], *,
                chat_template: str | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, tokenize: bool = True) -> Any:
    """Token ids (or text) of a conversation rendered by the chat template."""
    messages = _flatten_content(validate_messages(messages))
    template = read_chat_template(chat_template) if chat_template else None
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat template; pass chat_template= (a Jinja string or a "
            "file), or use completions with a plain prompt."
        )
    if continue_final_message and add_generation_prompt:
        add_generation_prompt = False
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    )
    if not tokenize:
        return text
    # The template already holds the BOS token where the model wants one.
    return tokenizer.encode(text, add_special_tokens=False)
