"""Checks of tensor_parallel_size against the model and the machine, at engine construction."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.config import ModelConfig


def _shape_problem(model: ModelConfig, tp: int) -> str | None:
    """What keeps `tp` ranks from splitting this model evenly, or None."""
    heads, kv_heads = model.num_attention_heads, model.num_kv_heads
    intermediate = getattr(model.hf_config, "intermediate_size", None)
    if heads % tp:
        return f"it must divide num_attention_heads={heads}"
    if kv_heads >= tp and kv_heads % tp:
        return f"it must divide num_key_value_heads={kv_heads}"
    if kv_heads < tp and tp % kv_heads:
        return (f"it must be a multiple of num_key_value_heads={kv_heads} when larger "
                "(each KV head is then replicated on tensor_parallel_size / num_kv_heads ranks)")
    if isinstance(intermediate, int) and intermediate % tp:
        return f"it must divide intermediate_size={intermediate}"
    return None


def resolve_tensor_parallel(model: ModelConfig, tensor_parallel_size: int,
                            backend: str | None, device: str) -> str | None:
    """Validate tensor parallelism for this model and machine; return the executor backend
    ('mp' or 'ray', None for one process). Raises ValueError saying what to change."""
    tp = tensor_parallel_size
    if tp == 1:
        return None
    if model.runner != "generate":
        raise ValueError("tensor_parallel_size > 1 is supported for text generation only; "
                         "run pooling (embedding) models with tensor_parallel_size=1.")
    problem = _shape_problem(model, tp)
    if problem is not None:
        valid = [n for n in range(1, model.num_attention_heads + 1)
                 if _shape_problem(model, n) is None]
        raise ValueError(f"tensor_parallel_size={tp} does not fit {model.architecture}: "
                         f"{problem}. Sizes that fit this model: "
                         f"{', '.join(map(str, valid))}.")
    backend = backend or "mp"
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("distributed_executor_backend='ray' needs Ray, which is not "
                         "installed: pip install 'pagedllm[ray]' (or use 'mp' on one machine).")
    if backend == "mp" and device == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if tp > visible:
            raise ValueError(
                f"tensor_parallel_size={tp} needs {tp} GPUs, but this machine has {visible} "
                "visible. Lower tensor_parallel_size, or span several machines with "
                "distributed_executor_backend='ray'.")
    return backend
