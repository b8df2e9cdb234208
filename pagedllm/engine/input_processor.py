"""Prompt validation and tokenization; the tokenizer loader."""

from __future__ import annotations

import os
from typing import Any

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


def load_tokenizer(model_config: ModelConfig) -> Any:
    """The HF tokenizer for the model (rebuilt from GGUF metadata for .gguf models)."""
    if model_config.load_format == "gguf" and model_config.tokenizer == model_config.model_path:
        from pagedllm.models.loader.gguf_tokenizer import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(model_config.model_path)
    else:
        from transformers import AutoTokenizer

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
    bad = [t for t in ids if not 0 <= t < vocab_size] if (
        min(ids) < 0 or max(ids) >= vocab_size) else None
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


class InputProcessor:
    """The front-end's request checks: tokenizer, EOS ids, prompt and params validation.

    Shared by the offline engine and the server's `AsyncLLM`; the engine core receives only
    what this has checked."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model
        if config.model.skip_tokenizer_init:
            self.tokenizer: Any = None
            eos = getattr(config.model.hf_config, "eos_token_id", None)
            self.eos_token_id = eos[0] if isinstance(eos, list) and eos else eos
            self.extra_eos_ids: set[int] = set(eos[1:]) if isinstance(eos, list) else set()
        else:
            self.tokenizer = load_tokenizer(config.model)
            self.eos_token_id, self.extra_eos_ids = eos_token_ids(config.model, self.tokenizer)

    def process_inputs(self, prompt: PromptType, params: SamplingParams,
                       prompt_token_ids: list[int] | None = None,
                       prompt_text: str | None = None,
                       check_length: bool = False) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt, with `params` checked and completed.

        `check_length`: refuse prompt + max_tokens over max_model_len (the server's rule;
        offline, max_tokens is cut to what fits)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        if prompt_token_ids is None:
            prompt_text, prompt_token_ids = tokenize_prompt(
                prompt, self.tokenizer, self.model_config, params)
        max_len = self.model_config.max_model_len
        max_tokens = params.max_tokens
        if check_length and max_tokens is not None and len(prompt_token_ids) + max_tokens > max_len:
            raise ValueError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {len(prompt_token_ids) + max_tokens} tokens "
                f"({len(prompt_token_ids)} in the prompt, {max_tokens} for the completion). "
                "Reduce the prompt or max_tokens.")
        self.prepare_params(params)
        return prompt_text, prompt_token_ids

    def prepare_params(self, params: SamplingParams) -> None:
        """Fill engine-known parts of the params (extra EOS ids, bad words) and check
        limits that depend on the model."""
        params._all_stop_token_ids |= self.extra_eos_ids
        if self.tokenizer is None:
            if params.stop:
                raise ValueError("stop strings need a tokenizer; the engine was started with "
                                 "skip_tokenizer_init=True.")
            params.detokenize = False
        vocab = self.model_config.vocab_size
        for name in ("stop_token_ids", "allowed_token_ids"):
            for tid in getattr(params, name) or []:
                if tid >= vocab:
                    raise ValueError(f"{name} holds {tid}, outside the vocabulary of {vocab}.")
        for tid in params.logit_bias or {}:
            if not 0 <= tid < vocab:
                raise ValueError(f"logit_bias token {tid} is outside the vocabulary of {vocab}.")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer; the engine was started with "
                                 "skip_tokenizer_init=True.")
            from pagedllm.worker.logits_processors import bad_words_token_ids

            params._bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
            bad = [t for ids in params._bad_words_token_ids for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"bad_words tokenize to id {bad[0]}, outside the model's "
                                 f"vocabulary of {vocab}.")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer; the engine was started "
                                 "with skip_tokenizer_init=True.")
            if params._structured_outputs_backend is None:
                from pagedllm.structured_output import validate_structured_outputs

                params._structured_outputs_backend = validate_structured_outputs(
                    params.structured_outputs, self.config.structured_outputs)
        max_seqs = self.config.scheduler.max_num_seqs
        if params.best_of > max_seqs:
            raise ValueError(f"n / best_of ({params.best_of}) is more than max_num_seqs "
                             f"({max_seqs}), the most sequences one step can run.")
        max_lp = self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and (vocab if value == -1 else value) > max_lp:
                raise ValueError(
                    f"{name}={value} asks for more than max_logprobs={max_lp} alternatives "
                    f"(-1 means the whole vocabulary of {vocab}); raise max_logprobs or ask "
                    "for fewer.")
