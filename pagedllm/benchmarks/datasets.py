"""Workloads for `pagedllm bench serve`: random token prompts or a JSONL file of prompts.

A request is a prompt text, its length in tokens (by the benchmark's tokenizer) and the
number of tokens to ask for.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int
    output_len: int


def get_tokenizer(name: str | None, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a folder or hub id, a .gguf file, or pagedllm's default model's name
    (None too). Raises ValueError with a hint when none can be loaded."""
    from pagedllm.models.loader.gguf_loader import (
        DEFAULT_MODEL_NAME,
        find_default_model,
        load_gguf_tokenizer,
    )

    if name is None or name == DEFAULT_MODEL_NAME:
        return load_gguf_tokenizer(find_default_model())
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ValueError(f"tokenizer file {name!r} does not exist.")
        return load_gguf_tokenizer(name)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {name!r} ({e}); pass --tokenizer with a "
                         "model folder, hub id in the local cache or .gguf file.") from e


def _length_range(mean: int, ratio: float) -> tuple[int, int]:
    return max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))


def random_requests(tokenizer: Any, num_prompts: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list[SampleRequest]:
    """Prompts of random (non-special) token ids with lengths uniform in
    [len * (1 - range_ratio), len * (1 + range_ratio)], re-tokenized to their exact length."""
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    in_lo, in_hi = _length_range(input_len, range_ratio)
    out_lo, out_hi = _length_range(output_len, range_ratio)
    out: list[SampleRequest] = []
    for _ in range(num_prompts):
        n = rng.randint(in_lo, in_hi)
        ids = [rng.choice(vocab) for _ in range(n)]
        # Decoding and encoding again may merge or split tokens: cut to n, decode once more.
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)[:n]
        text = tokenizer.decode(ids)
        prompt_len = len(tokenizer.encode(text, add_special_tokens=False))
        out.append(SampleRequest(text, prompt_len, rng.randint(out_lo, out_hi)))
    return out


def jsonl_requests(path: str, num_prompts: int, output_len: int, tokenizer: Any | None,
                   seed: int = 0, shuffle: bool = False) -> list[SampleRequest]:
    """Requests from a JSONL file: each line a JSON string (the prompt) or an object with
    "prompt" and optionally "output_len" (or "max_tokens"). Cycled to `num_prompts`."""
    if not os.path.isfile(path):
        raise ValueError(f"--dataset-path {path!r} is not a file.")
    rows: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg}).") from e
            if isinstance(item, str):
                rows.append((item, output_len))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                n = item.get("output_len", item.get("max_tokens", output_len))
                if not isinstance(n, int) or n < 1:
                    raise ValueError(f"{path}:{lineno}: output_len must be a positive integer.")
                rows.append((item["prompt"], n))
            else:
                raise ValueError(f'{path}:{lineno}: expected a string or {{"prompt": ...}}.')
    if not rows:
        raise ValueError(f"--dataset-path {path!r} holds no prompts.")
    if shuffle:
        random.Random(seed).shuffle(rows)
    picked = [rows[i % len(rows)] for i in range(num_prompts)]
    return [SampleRequest(p, len(tokenizer.encode(p, add_special_tokens=False))
                          if tokenizer is not None else 0, n) for p, n in picked]
