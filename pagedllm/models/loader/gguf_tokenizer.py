"""The fast tokenizer of a GGUF file, rebuilt from its metadata (with chat template)."""

from __future__ import annotations

import os
from typing import Any

from pagedllm.models.loader.gguf_reader import GGUFCheckpoint, open_checkpoint


def load_gguf_tokenizer(path: str | os.PathLike[str] | GGUFCheckpoint) -> Any:
    """Rebuild the fast tokenizer from GGUF metadata, with chat template and BOS/EOS set."""
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(path)
    if not ckpt.get("tokenizer.ggml.tokens"):
        raise ValueError(f"GGUF file {str(ckpt.path)!r} has no tokenizer (tokenizer.ggml.tokens)")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path.parent), gguf_file=ckpt.path.name)
    template = ckpt.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    tokens = ckpt.get("tokenizer.ggml.tokens") or []
    for key, attr in (
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
    ):
        token_id = ckpt.get(key)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            if getattr(tokenizer, attr) != tokens[int(token_id)]:
                setattr(tokenizer, attr, tokens[int(token_id)])
    return tokenizer
