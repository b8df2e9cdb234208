"""Find a model: a local HF folder, a .gguf file, a hub id (local cache first), or the default."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # folder with config.json, or a .gguf file
    tokenizer_path: str
    hf_config: Any
    load_format: str


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _download(repo_id: str, revision: str | None, download_dir: str | None) -> str:
    """Resolve a hub id to a local snapshot folder (cache first; download if allowed)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                 allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception as cached_error:  # not in the cache (or incomplete)
        if _is_offline():
            raise ValueError(
                f"Model {repo_id!r} is neither a local folder nor in the local Hugging Face "
                "cache, and HF_HUB_OFFLINE is set. Download it first or pass a local path."
            ) from cached_error
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                 allow_patterns=_HUB_PATTERNS)
    except Exception as e:
        raise ValueError(
            f"Model {repo_id!r} is not a local folder or .gguf file, and downloading it from "
            f"the Hugging Face hub failed ({type(e).__name__}: {e}). Check the name, your "
            "network, or pass a local path."
        ) from e


def _load_hf_config(folder: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(
            f"{folder!r} has no config.json, so it is not a Hugging Face model folder. Pass a "
            "folder saved with save_pretrained (config.json + *.safetensors + tokenizer) or a "
            ".gguf file."
        )
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ValueError(f"Cannot read {folder}/config.json: {e}") from e


def resolve_model(model: str | None, *, revision: str | None = None,
                  trust_remote_code: bool = False, download_dir: str | None = None,
                  load_format: str = "auto") -> ResolvedModel:
    """Turn what the user passed as `model` into a local path, config and load format."""
    if model is None:
        from pagedllm.models.loader.gguf_loader import find_default_model

        model = find_default_model()
        logger.info("No model given: using the default model %s", model)
    path = os.path.expanduser(model)
    if path.endswith(".gguf") or load_format == "gguf":
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file {path!r} does not exist.")
        from pagedllm.models.loader.gguf_loader import gguf_to_hf_config

        return ResolvedModel(path, path, gguf_to_hf_config(path), "gguf")
    if os.path.isdir(path):
        folder = path
    elif path.startswith(("/", "./", "../", "~")) or os.sep * 2 in path or path.count("/") > 1:
        raise ValueError(f"Model folder {path!r} does not exist.")
    else:
        folder = _download(model, revision, download_dir)
    hf_config = _load_hf_config(folder, trust_remote_code)
    fmt = "safetensors" if load_format == "auto" else load_format
    if fmt == "safetensors" and not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        if any(f.endswith(".bin") for f in os.listdir(folder)):
            fmt = "pt"
        else:
            raise ValueError(
                f"{folder!r} holds no *.safetensors or *.bin weights. Add the weights, or use "
                "load_format='dummy' for random weights."
            )
    return ResolvedModel(folder, folder, hf_config, fmt)
