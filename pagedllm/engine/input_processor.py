"""Prompt validation and tokenization; the tokenizer loader."""

from __future__ import annotations

import os
from typing import Any

from pagedllm.config import ModelConfig
from pagedllm.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


def load_tokenizer(model_config: ModelConfig) -> Any:
    """The HF tokenizer for the model (rebuilt from GGUF metadata for .gguf models)."""
    from transformers import AutoTokenizer

    if model_config.load_format == "gguf" and model_config.tokenizer == model_config.model_path:
        from pagedllm.models.loader.gguf_loader import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(model_config.model_path)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_config.tokenizer,
                trust_remote_code=model_config.trust_remote_code,
                revision=model_config.tokenizer_revision,
            )
        except (OSError, ValueError) as e:
            raise ValueError(
                f"Cannot load a tokenizer from {model_config.tokenizer!r} ({e}). Pass "
                "tokenizer=<folder or hub id> or add tokenizer files to the model folder."
            ) from e
    if model_config.chat_template:
        tokenizer.chat_template = read_chat_template(model_config.chat_template)
    return tokenizer


def read_chat_template(template: str) -> str:
    """A chat template given inline or as a path to a .jinja file."""
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    if "{" not in template:
        raise ValueError(
            f"chat_template {template!r} is neither a file nor a Jinja template string."
        )
    return template


def eos_token_ids(model_config: ModelConfig, tokenizer: Any) -> tuple[int | None, set[int]]:
    """The tokenizer's EOS id, plus extra EOS ids from generation_config.json."""
    eos = tokenizer.eos_token_id
    extra: set[int] = set()
    path = os.path.join(model_config.model_path, "generation_config.json")
    if os.path.isfile(path):
        import json

        with open(path) as f:
            gen_eos = json.load(f).get("eos_token_id")
        if isinstance(gen_eos, int):
            gen_eos = [gen_eos]
        extra = {int(t) for t in gen_eos or [] if t != eos}
    return eos, extra


def prompt_token_ids(prompt: PromptType, tokenizer: Any, vocab_size: int,
                     lower_case: bool = False) -> tuple[str | None, list[int]]:
    """Validate a prompt (a string, or a dict with 'prompt' / 'prompt_token_ids') and return
    (text or None, its non-empty token ids, all inside the vocabulary)."""
    text: str | None
    ids: list[int] | None
    if isinstance(prompt, str):
        text, ids = prompt, None
    elif isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            raw = prompt["prompt_token_ids"]
            if not isinstance(raw, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, int) for t in raw
            ):
                raise ValueError("prompt_token_ids must be a list of integers.")
            text, ids = prompt.get("prompt"), list(raw)
        elif "prompt" in prompt:
            text, ids = prompt["prompt"], None
            if not isinstance(text, str):
                raise ValueError("prompt must be a string.")
        else:
            raise ValueError("A prompt dict needs 'prompt' or 'prompt_token_ids'.")
    else:
        raise ValueError(
            f"A prompt must be a string or a dict with 'prompt' / 'prompt_token_ids', got "
            f"{type(prompt).__name__}."
        )
    if ids is None:
        if tokenizer is None:
            raise ValueError("Text prompts need a tokenizer, but the engine was started with "
                             "skip_tokenizer_init=True; pass {'prompt_token_ids': [...]}.")
        if not text:
            raise ValueError("The prompt is empty; pass at least one character or token.")
        ids = tokenizer.encode(text.lower() if lower_case else text, add_special_tokens=True)
    if not ids:
        raise ValueError("The prompt is empty; pass at least one token.")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"Token id {bad[0]} is out of range: the vocabulary has {vocab_size} tokens."
        )
    return text, ids


def tokenize_prompt(prompt: PromptType, tokenizer: Any, model_config: ModelConfig,
                    params: SamplingParams | None) -> tuple[str | None, list[int]]:
    """Validate a prompt and return (text or None, token ids) that leave room to generate."""
    text, ids = prompt_token_ids(prompt, tokenizer, model_config.vocab_size)
    truncate = params.truncate_prompt_tokens if params is not None else None
    if truncate is not None and len(ids) > truncate:
        ids = ids[-truncate:]
    if len(ids) >= model_config.max_model_len:
        raise ValueError(
            f"The prompt has {len(ids)} tokens, but max_model_len is "
            f"{model_config.max_model_len}, which must also leave room for at least one "
            "generated token. Shorten the prompt, pass truncate_prompt_tokens, or raise "
            "max_model_len."
        )
    return text, ids
