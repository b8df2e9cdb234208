"""Build a model on its device and fill its weights from the checkpoint format."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from pagedllm.attention.backends.abstract import AttentionImpl
from pagedllm.config import ModelConfig
from pagedllm.distributed.group import SINGLE_PROCESS, TensorParallelGroup
from pagedllm.models.loader.weights import init_dummy_weights, iterate_pt, iterate_safetensors
from pagedllm.models.registry import get_entry, get_model_class
from pagedllm.quantization.kv_cache import KVScaleLoader
from pagedllm.quantization.loader import QuantizedLoader

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, attn_impl: type[AttentionImpl] | None,
               device: torch.device, tp: TensorParallelGroup = SINGLE_PROCESS) -> nn.Module:
    """Instantiate the registered class for the architecture and load its weights."""
    start = time.perf_counter()
    cls = get_model_class(model_config.architecture)
    with _default_dtype(model_config.dtype), device:
        if get_entry(model_config.architecture).paged_kv:  # decoders (also as embedders)
            model = cls(model_config.hf_config, attn_impl, model_config.max_model_len,
                        model_config.sliding_window, tp)
        else:  # encoder-only models attend without a paged KV cache
            model = cls(model_config.hf_config)
    fmt = model_config.load_format
    quant = _quantized_loader(model, model_config, device)
    if fmt == "dummy":
        init_dummy_weights(model, model_config.seed)
        if quant is not None and quant.spec.from_checkpoint:
            quant.init_dummy(model_config.seed)
    elif fmt == "gguf" and model_config.quantization == "gguf":
        from pagedllm.models.loader.gguf_loader import load_packed_gguf

        load_packed_gguf(model, model_config.model_path, model_config.dtype)
    elif fmt == "gguf":
        from pagedllm.models.loader.gguf_loader import iterate_gguf_weights

        model.load_weights(iterate_gguf_weights(model_config.model_path))
    else:
        weights = (iterate_pt(model_config.model_path) if fmt == "pt"
                   else iterate_safetensors(model_config.model_path))
        if quant is not None:
            weights = quant.wrap(weights)
        elif get_entry(model_config.architecture).paged_kv:
            weights = KVScaleLoader(model).wrap(weights)
        model.load_weights(weights)
    if quant is not None:
        quant.finish()
    model.eval()
    if device.type == "cpu":
        _release_freed_memory()
    packed = f" {model_config.quantization}" if model_config.quantization else ""
    logger.info("Loaded %s (%s%s, %s) in %.2f s", model_config.architecture, fmt, packed,
                str(model_config.dtype).removeprefix("torch."), time.perf_counter() - start)
    return model


def _quantized_loader(model: nn.Module, model_config: ModelConfig,
                      device: torch.device) -> QuantizedLoader | None:
    """The loader of a model's quantized linear layers (None: dense), prepared."""
    if model_config.quant is None:
        return None
    if not get_entry(model_config.architecture).paged_kv:
        raise ValueError(f"quantization {model_config.quant.method!r} is supported for "
                         "decoder models only.")
    loader = QuantizedLoader(model, model_config.quant, model_config.dtype, device)
    loader.prepare()
    return loader


def _release_freed_memory() -> None:
    """Give the heap freed by weight conversion back to the OS (glibc keeps it otherwise,
    and the process's resident memory stays at the loading peak)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

