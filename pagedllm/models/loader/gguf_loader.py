"""GGUF checkpoints in the engine: HF-named weights (dense) and the public entry points.

The parts live in their own modules: ``gguf_reader`` (header parser, tensor access),
``gguf_dequant`` (numpy dequantization), ``gguf_pack`` (quantized blocks -> CPU kernel
layouts), ``gguf_config`` (metadata -> transformers config), ``gguf_tokenizer`` (tokenizer
rebuild) and ``default_model`` (the default model's file). This module keeps their names
importable from one place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from pagedllm.models.loader.default_model import (  # noqa: F401 (re-exported)
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    find_default_model,
)
from pagedllm.models.loader.gguf_config import gguf_to_hf_config  # noqa: F401
from pagedllm.models.loader.gguf_reader import (  # noqa: F401
    _GLOBAL_TENSOR_MAP,
    _LAYER_TENSOR_MAP,
    ARCHITECTURE_ALIASES,
    SUPPORTED_QUANT_TYPES,
    GGUFCheckpoint,
    GGUFTensorInfo,
    open_checkpoint,
)
from pagedllm.models.loader.gguf_tokenizer import load_gguf_tokenizer  # noqa: F401

logger = logging.getLogger(__name__)


def iterate_gguf_weights(
    path: str | os.PathLike[str] | GGUFCheckpoint, dtype: torch.dtype = torch.float32,
    skip: set[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` pairs, dequantized to ``dtype`` and in HF shape
    (``skip``: HF names to leave out, e.g. those loaded packed).

    ``lm_head.weight`` is yielded only when the file has an ``output.weight`` tensor
    (otherwise the config says ``tie_word_embeddings=True``).
    """
    ckpt = open_checkpoint(path)  # opened eagerly so that a bad file raises here
    return _iter_weights(ckpt, dtype, skip=skip or set())


def _iter_weights(
    ckpt: GGUFCheckpoint, dtype: torch.dtype = torch.float32, num_threads: int | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every mapped tensor, dequantized to ``dtype``.

    Dequantization of the next few tensors runs in a small thread pool (numpy releases
    the GIL) while the caller consumes the current one; at most ``2 * threads`` tensors
    are in flight, so memory stays bounded for large models.
    """
    jobs: list[tuple[str, GGUFTensorInfo]] = []
    for info in ckpt.tensors:
        name = ckpt.hf_name(info.name)
        if name is None:
            logger.warning("Skipping GGUF tensor %s: no HF counterpart", info.name)
            continue
        if name not in skip:
            jobs.append((name, info))
    for name, tensor in _iter_jobs(ckpt, jobs, dtype, num_threads):
        if "{expert}" in name:  # a stack of experts: one HF tensor per expert
            for expert in range(tensor.shape[0]):
                yield name.format(expert=expert), tensor[expert]
        else:
            yield name, tensor


def _iter_jobs(
    ckpt: GGUFCheckpoint, jobs: list[tuple[str, GGUFTensorInfo]], dtype: torch.dtype,
    num_threads: int | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize `jobs` in order, a few ahead of the consumer in a thread pool."""
    threads = num_threads or min(4, os.cpu_count() or 1)

    def convert(info: GGUFTensorInfo) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(ckpt.dequantize(info)))
        return tensor if dtype == torch.float32 else tensor.to(dtype)

    if threads <= 1:
        for name, info in jobs:
            yield name, convert(info)
        return
    window = 2 * threads
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gguf-deq") as pool:
        pending: list[tuple[str, Future[torch.Tensor]]] = []
        for name, info in jobs:
            pending.append((name, pool.submit(convert, info)))
            if len(pending) >= window:
                done_name, fut = pending.pop(0)
                yield done_name, fut.result()
        for done_name, fut in pending:
            yield done_name, fut.result()


def load_packed_gguf(model: torch.nn.Module, path: str | os.PathLike[str] | GGUFCheckpoint,
                     dtype: torch.dtype) -> None:
    """Fill `model` from a GGUF file with its quantized weights kept packed (CPU, one
    process): linear layers (fused q/k/v and gate/up included), the embedding and the LM
    head get a `PackedWeight`; everything else (norms, biases, F16 / F32 tensors, types
    without a packed form) is dequantized to `dtype`. `dtype` is the activation dtype."""
    from pagedllm.models.layers.linear import ColumnParallelLinear, RowParallelLinear
    from pagedllm.models.layers.quantized import PackedWeight, attach_packed
    from pagedllm.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
    from pagedllm.models.loader.gguf_pack import Int4Rows, packed_kind, rows_for
    from pagedllm.models.loader.pack_cache import PackCache

    ckpt = open_checkpoint(path)
    cache = PackCache(ckpt.path, dtype)
    groups: dict[str, dict[object, tuple[str, GGUFTensorInfo]]] = {}
    for info in ckpt.tensors:
        hf = ckpt.hf_name(info.name)
        if hf is None or not hf.endswith(".weight") or len(info.shape) != 2:
            continue
        name, shard = model.checkpoint_name(hf.removeprefix("model."))
        module_name = name.rsplit(".", 1)[0]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            groups.setdefault(module_name, {})[shard] = (hf, info)
    skip: set[str] = set()
    dense_types: set[str] = set()
    packed_bytes = 0
    for module_name, parts in groups.items():
        module = model.get_submodule(module_name)
        kinds = {packed_kind(info.qtype) for _, info in parts.values()}
        if None in kinds:
            dense_types.update(info.qtype.name for _, info in parts.values()
                               if packed_kind(info.qtype) is None)
            continue
        # lookups need int8 rows; an untied LM head may take int4
        embedding = (isinstance(module, VocabParallelEmbedding)
                     and not isinstance(module, ParallelLMHead))
        kind = "int4" if kinds == {"int4"} and not embedding else "int8"
        order = _shard_order(module, parts)
        weight = module.weight
        packed = cache.get(module_name, kind, weight)
        if packed is None:
            pieces = [rows_for(ckpt.raw_rows(parts[s][1]), parts[s][1].qtype, kind)
                      for s in order]
            n = sum(p.codes.shape[0] for p in pieces)
            if weight is None or (n, pieces[0].codes.shape[1]) != tuple(weight.shape):
                raise ValueError(f"GGUF tensors for {module_name} make a [{n}, "
                                 f"{pieces[0].codes.shape[1]}] weight; the model expects "
                                 f"{tuple(weight.shape) if weight is not None else '?'}.")
            fields = ("codes", "scale", "zero") if kind == "int4" else ("codes", "scale")
            cat = [np.concatenate([getattr(p, f) for p in pieces]) for f in fields]
            packed = (PackedWeight.int4(*cat, dtype=dtype) if isinstance(pieces[0], Int4Rows)
                      else PackedWeight.int8(*cat, dtype=dtype))
            cache.put(module_name, packed)
        tied = getattr(model, "tie_word_embeddings", False) and module_name == "embed_tokens"
        attach_packed(module, packed)
        if tied:
            attach_packed(model.lm_head, packed)
        packed_bytes += packed.nbytes
        skip.update(hf for hf, _ in parts.values())
    if dense_types:
        logger.info("GGUF types without a packed CPU kernel are dequantized to %s: %s",
                    str(dtype).removeprefix("torch."), ", ".join(sorted(dense_types)))
    cache.save()
    logger.info("Packed %d GGUF weights (%.1f MiB) for the CPU kernels%s", len(skip),
                packed_bytes / 2**20, " (from the pack cache)" if cache.hits else "")
    model.load_weights(_iter_weights(ckpt, dtype, skip=skip))


def _shard_order(module: torch.nn.Module, parts: dict[object, object]) -> list[object]:
    """The row order of a fused layer's checkpoint pieces (q, k, v / gate, up / whole)."""
    from pagedllm.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    if isinstance(module, QKVParallelLinear):
        order: list[object] = ["q", "k", "v"]
    elif isinstance(module, MergedColumnParallelLinear):
        order = list(range(len(module.shard_sizes)))
    else:
        order = [None]
    if set(parts) == {None}:  # one fused tensor (Phi-3's qkv / gate-up), rows in layer order
        return [None]
    if set(order) != set(parts):
        raise ValueError(f"GGUF file has pieces {sorted(map(str, parts))} of a layer made of "
                         f"{[str(o) for o in order]}.")
    return order
