"""Rendering chat conversations (with tools) through the tokenizer's chat template.

The one renderer behind `LLM.chat` and the server's chat endpoints. Input is checked here
and refused with `ChatInputError` (a ValueError naming the offending field) before the
template runs; the server turns it into a 400 with that field as `param`.
"""

from __future__ import annotations

import json
from typing import Any

_ROLES = ("system", "user", "assistant", "tool", "developer")
_TEXT_PART_TYPES = ("text", "input_text")
# Keyword arguments of apply_chat_template that chat_template_kwargs may not set (each has
# its own argument, or would change what apply_chat_template returns).
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tokenize", "return_dict", "return_tensors",
    "tokenizer_kwargs", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "padding", "truncation", "max_length",
    "return_assistant_tokens_mask",
})


class ChatInputError(ValueError):
    """Bad chat input; `param` is the offending field (e.g. ``messages.2.tool_call_id``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _as_dict(value: Any) -> Any:
    """Pydantic models (the server's request objects) as plain dicts, without unset Nones."""
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True) if callable(dump) else value


def validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    """`tools` in the OpenAI shape: [{"type": "function", "function": {"name", ...}}]."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ChatInputError("tools must be a list of {'type': 'function', 'function': "
                             "{'name': ..., 'parameters': {...}}} objects.", "tools")
    out = []
    for i, tool in enumerate(tools):
        tool = _as_dict(tool)
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise ChatInputError(f"{where} must be an object with 'type' and 'function'.", where)
        if tool.get("type", "function") != "function":
            raise ChatInputError(f"{where}.type is {tool.get('type')!r}; only 'function' tools "
                                 "are supported.", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ChatInputError(f"{where}.function must be an object with 'name' (and "
                                 "optionally 'description' and 'parameters').", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ChatInputError(f"{where}.function.name must be a non-empty string.",
                                 f"{where}.function.name")
        if "description" in fn and not isinstance(fn["description"], str):
            raise ChatInputError(f"{where}.function.description must be a string.",
                                 f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ChatInputError(f"{where}.function.parameters must be a JSON Schema object, "
                                 f"got {type(params).__name__}.", f"{where}.function.parameters")
        out.append({**tool, "type": "function"})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ChatInputError(f"tools: the function name {dup!r} is given more than once.",
                             "tools")
    return out


def _flatten_content(content: Any, where: str) -> str:
    """A message's content as text; a list of text parts is joined with newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatInputError(f"{where} must be a string or a list of text parts.", where)
    texts = []
    for j, part in enumerate(content):
        part = _as_dict(part)
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise ChatInputError(f"{where}: only text parts are supported, got a {kind!r} "
                                 f"part at {j}.", where)
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls_for_template(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's OpenAI `tool_calls`, with `arguments` parsed into a dict as
    tool-aware chat templates expect it."""
    if not isinstance(calls, list):
        raise ChatInputError(f"{where} must be a list of tool calls.", where)
    out = []
    for j, call in enumerate(calls):
        call = _as_dict(call)
        at = f"{where}.{j}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatInputError(f"{at} must be {{'id', 'type': 'function', 'function': "
                                 "{'name', 'arguments'}}.", f"{at}.function")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ChatInputError(f"{at}.function.arguments is not valid JSON ({e}).",
                                     f"{at}.function.arguments") from e
        if not isinstance(args, dict):
            raise ChatInputError(f"{at}.function.arguments must be a JSON object.",
                                 f"{at}.function.arguments")
        out.append({**call, "type": call.get("type", "function"),
                    "function": {**fn, "arguments": args}})
    return out


def to_conversation(messages: Any) -> list[dict[str, Any]]:
    """Checked messages as plain dicts for the template (content flattened to text)."""
    if not isinstance(messages, list) or not messages:
        raise ChatInputError("messages must be a non-empty list of {'role', 'content'} "
                             "objects.", "messages")
    conversation = []
    for i, message in enumerate(messages):
        m = _as_dict(message)
        where = f"messages.{i}"
        if not isinstance(m, dict) or "role" not in m:
            raise ChatInputError(f"{where} must be an object with 'role' and 'content'.", where)
        role = m["role"]
        if role not in _ROLES:
            raise ChatInputError(f"{where}.role is {role!r}; use one of {', '.join(_ROLES)}.",
                                 f"{where}.role")
        entry = {**m, "content": _flatten_content(m.get("content"), f"{where}.content")}
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise ChatInputError(f"{where}.tool_calls: only assistant messages carry tool "
                                     "calls.", f"{where}.tool_calls")
            entry["tool_calls"] = _tool_calls_for_template(m["tool_calls"],
                                                           f"{where}.tool_calls")
        else:
            entry.pop("tool_calls", None)
        if role == "tool" and not (isinstance(m.get("tool_call_id"), str)
                                   and m["tool_call_id"]):
            raise ChatInputError(f"{where} is a tool message without tool_call_id; set it to "
                                 "the id of the assistant's tool call it answers.",
                                 f"{where}.tool_call_id")
        conversation.append(entry)
    return conversation


def _template_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ChatInputError("chat_template_kwargs must be an object of template variables.",
                             "chat_template_kwargs")
    reserved = sorted(k for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise ChatInputError(f"chat_template_kwargs may not set {', '.join(reserved)}; use "
                             "the request's own field.", f"chat_template_kwargs.{reserved[0]}")
    return dict(kwargs)


def render_chat(tokenizer: Any, messages: Any, *, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: Any = None, documents: list[dict[str, str]] | None = None,
                chat_template_kwargs: dict[str, Any] | None = None,
                tokenize: bool = True) -> Any:
    """Token ids (or, with ``tokenize=False``, text) of a conversation rendered by the chat
    template.

    `messages` are OpenAI-style dicts (or the server's message models); `chat_template` is
    template text (None: the tokenizer's own); `tools` reach the template as ``tools``, and
    `chat_template_kwargs` (e.g. ``{"enable_thinking": False}``) as extra template variables.
    """
    conversation = to_conversation(messages)
    tools = validate_tools(tools)
    extra = _template_kwargs(chat_template_kwargs)
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise ChatInputError(
            "The model has no chat template; pass a chat template (offline: chat_template=, "
            "server: --chat-template FILE), or use completions with a plain prompt.",
            "messages")
    if continue_final_message and add_generation_prompt:
        raise ChatInputError("continue_final_message and add_generation_prompt cannot both "
                             "be true; set add_generation_prompt=false.",
                             "continue_final_message")
    if continue_final_message and conversation[-1]["role"] != "assistant":
        raise ChatInputError("continue_final_message needs the last message to be from the "
                             "assistant.", "continue_final_message")
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=chat_template or None, tools=tools,
            documents=documents, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **extra)
    except Exception as e:  # jinja2 errors, raise_exception() in templates, bad kwargs
        raise ChatInputError(f"Could not apply the chat template: {e}", "messages") from e
    if not isinstance(text, str):
        raise ChatInputError("The chat template did not render to text.", "messages")
    if not tokenize:
        return text
    # The template already holds the BOS token where the model wants one.
    return tokenizer.encode(text, add_special_tokens=False)
