"""Where the GGUF caches live and how their entries are keyed.

Two caches spare later starts the slow parts of loading a GGUF file: its packed CPU
weights (``pack_cache``) and its tokenizer rebuilt from metadata (``gguf_tokenizer``). Both
sit under ``$PAGEDLLM_CACHE_DIR`` (default ``~/.cache/pagedllm``), key an entry by the
file's absolute path, size and modification time plus what else its content depends on, and
are turned off together with ``PAGEDLLM_PACK_CACHE=0``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_SWITCH_ENV = "PAGEDLLM_PACK_CACHE"


def cache_root() -> Path:
    """The folder that holds every pagedllm cache."""
    root = os.environ.get("PAGEDLLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pagedllm")
    return Path(root)


def cache_enabled() -> bool:
    """False when ``PAGEDLLM_PACK_CACHE`` is 0 / false / no / off."""
    return os.environ.get(CACHE_SWITCH_ENV, "1").lower() not in ("0", "false", "no", "off")


def file_key(path: Path, *extra: object) -> str:
    """A name for the cache entry of `path` (and the `extra` values its content depends
    on) that changes when the file is replaced or touched."""
    stat = path.stat()
    key = "|".join(map(str, (path.resolve(), stat.st_size, stat.st_mtime_ns, *extra)))
    return hashlib.sha256(key.encode()).hexdigest()[:32]
