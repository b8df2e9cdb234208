"""An on-disk cache of a GGUF file's packed CPU weights, so that later starts skip the
numpy repacking (seconds on two cores) and map the packed tensors straight from disk.

Entries are keyed by the file's absolute path, size and modification time, the activation
dtype, the torch version, the int4 layout (torch's, or the CPU kernels' tiles) and a format
version. The cache lives in ``$PAGEDLLM_CACHE_DIR/gguf-packed`` (default
``~/.cache/pagedllm``; see ``file_cache``); ``PAGEDLLM_PACK_CACHE=0`` turns it off. A cache
that cannot be read or written is skipped with a debug log line: the weights are then
packed as without it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pagedllm.models.layers.quantized import BASE_KIND, PackedWeight, int4_layout_tag
from pagedllm.models.loader.file_cache import cache_enabled, cache_root, file_key

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2


def cache_dir() -> Path:
    return cache_root() / "gguf-packed"


class PackCache:
    """Packed weights of one GGUF file for one activation dtype: `get` / `put` per module,
    `save` once after loading (only when something was packed anew)."""

    def __init__(self, gguf_path: Path, dtype: torch.dtype) -> None:
        self.enabled = cache_enabled()
        self.dtype = dtype
        self.entries: dict[str, dict[str, object]] = {}
        self.new = 0
        self.hits = 0
        self.file: Path | None = None
        if not self.enabled:
            return
        key = file_key(gguf_path, dtype, torch.__version__, FORMAT_VERSION,
                       int4_layout_tag() if dtype is torch.bfloat16 else "torch")
        self.file = cache_dir() / (key + ".pt")
        if self.file.is_file():
            try:
                self.entries = torch.load(self.file, mmap=True, weights_only=True)
            except Exception as e:  # a damaged or foreign file: repack
                logger.debug("Ignoring the pack cache %s: %s", self.file, e)
                self.entries = {}

    def get(self, name: str, kind: str, weight: torch.Tensor | None) -> PackedWeight | None:
        entry = self.entries.get(name)
        if (entry is None or weight is None or BASE_KIND.get(entry.get("kind")) != kind
                or (entry.get("out_features"), entry.get("in_features")) != tuple(weight.shape)):
            return None
        self.hits += 1
        return PackedWeight(entry["kind"], int(entry["out_features"]), int(entry["in_features"]),
                            self.dtype, entry["codes"], entry["scales"],
                            int(entry["group_size"]))

    def put(self, name: str, packed: PackedWeight) -> None:
        if not self.enabled:
            return
        self.new += 1
        self.entries[name] = {"kind": packed.kind, "out_features": packed.out_features,
                              "in_features": packed.in_features, "codes": packed.codes,
                              "scales": packed.scales, "group_size": packed.group_size}

    def save(self) -> None:
        if not self.enabled or not self.new or self.file is None:
            return
        tmp = self.file.with_suffix(f".tmp{os.getpid()}")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.entries, tmp)
            os.replace(tmp, self.file)
        except OSError as e:
            logger.debug("Could not write the pack cache %s: %s", self.file, e)
            tmp.unlink(missing_ok=True)
