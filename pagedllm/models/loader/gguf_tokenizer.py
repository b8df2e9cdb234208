"""The fast tokenizer of a GGUF file, rebuilt from its metadata (with chat template).

Rebuilding it (transformers' GGUF tokenizer converter over a 49k-token vocabulary) takes
seconds, so the result is saved once in ``$PAGEDLLM_CACHE_DIR/gguf-tokenizer/<key>/``
(``file_cache``: keyed by the file and the transformers version) and later loads read
that folder's tokenizer.json instead.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pagedllm.models.loader.file_cache import cache_enabled, cache_root, file_key
from pagedllm.models.loader.gguf_reader import GGUFCheckpoint, open_checkpoint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def load_gguf_tokenizer(path: str | os.PathLike[str] | GGUFCheckpoint) -> Any:
    """The fast tokenizer of a GGUF file, with chat template and BOS/EOS set: from the
    tokenizer cache when it holds this file's, else rebuilt (and cached)."""
    gguf_path = path.path if isinstance(path, GGUFCheckpoint) else Path(path)
    folder = _cache_folder(gguf_path)
    if folder is not None and (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        except Exception as e:  # a damaged entry: rebuild it
            logger.debug("Ignoring the tokenizer cache %s: %s", folder, e)
    tokenizer = rebuild_gguf_tokenizer(path)
    if folder is not None:
        _save(tokenizer, folder)
    return tokenizer


def rebuild_gguf_tokenizer(path: str | os.PathLike[str] | GGUFCheckpoint) -> Any:
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


def _cache_folder(gguf_path: Path) -> Path | None:
    if not cache_enabled():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = "?"
    try:
        key = file_key(gguf_path, transformers_version, FORMAT_VERSION)
    except OSError:
        return None
    return cache_root() / "gguf-tokenizer" / key


def _save(tokenizer: Any, folder: Path) -> None:
    """Write the tokenizer files into `folder` (whole or not at all)."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except OSError as e:
        logger.debug("Could not write the tokenizer cache %s: %s", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)
