"""Choose the attention backend by name (argument, env var) or by device."""

from __future__ import annotations

import importlib

import torch

from pagedllm.attention.backends.abstract import AttentionBackend

# name -> (module, class)
_BACKENDS = {
    "TORCH_SDPA": ("pagedllm.attention.backends.torch_sdpa", "TorchSDPABackend"),
    "TRITON_ATTN": ("pagedllm.attention.backends.triton_attn", "TritonAttentionBackend"),
    "FLASH_ATTN": ("pagedllm.attention.backends.flash_attn", "FlashAttentionBackend"),
}


def _load(name: str) -> type[AttentionBackend] | None:
    module_name, cls_name = _BACKENDS[name]
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except ImportError:
        return None


def available_backends(device: str) -> list[str]:
    names = []
    for name in _BACKENDS:
        cls = _load(name)
        if cls is not None and cls.is_available(device):
            names.append(name)
    return names


def get_attention_backend(name: str | None, device: str) -> type[AttentionBackend]:
    """The backend class for `name`, or the device's default (TRITON_ATTN on CUDA when
    available, TORCH_SDPA otherwise). Unknown or unavailable names raise ValueError."""
    if name is None:
        for candidate in (["TRITON_ATTN", "TORCH_SDPA"] if device == "cuda" else ["TORCH_SDPA"]):
            cls = _load(candidate)
            if cls is not None and cls.is_available(device):
                return cls
        raise ValueError(f"No attention backend is available on {device}.")
    key = name.upper()
    cls = _load(key) if key in _BACKENDS else None
    if cls is not None and not cls.is_available(device) and cls.unavailable_reason(device):
        raise ValueError(f"{cls.unavailable_reason(device)} Available here: "
                         f"{', '.join(available_backends(device))}.")
    if cls is None or not cls.is_available(device):
        raise ValueError(
            f"Attention backend {name!r} is unknown or not available on {device}. Available "
            f"here: {', '.join(available_backends(device))} (set with attention_backend= or "
            "PAGEDLLM_ATTENTION_BACKEND)."
        )
    return cls


def check_attention_config(name: str | None, device: str, block_size: int | None,
                           dtype: torch.dtype, head_size: int,
                           kv_cache_dtype: str = "auto") -> int:
    """Start-up check of the backend against the engine's settings; returns the KV block
    size to use (the backend's default where the user set none). Raises ValueError naming
    the setting to change."""
    backend = get_attention_backend(name, device)
    resolved = backend.resolve_block_size(block_size)
    backend.check_model(dtype, head_size)
    backend.check_kv_cache_dtype(kv_cache_dtype)
    return resolved
