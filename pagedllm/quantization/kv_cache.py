"""The KV cache's dtype (``kv_cache_dtype``: auto = the model dtype, fp8 = e4m3) and its
per-tensor scales.

An FP8 cache holds k / k_scale and v / v_scale (one float32 scale each per attention layer,
`layers/attention.Attention.k_scale` / `v_scale`), read by the attention kernels. Scales
come from the checkpoint where it has them (``self_attn.k_scale`` / ``v_scale``, compressed-
tensors' ``k_proj.output_scale`` / ``v_proj.output_scale``, or one ``kv_scale``); else they
are 1.0, with a warning (values beyond +-448 then saturate).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
_SCALE_NAME = re.compile(
    r"^(?:model\.)?(?P<layer>.*\.self_attn)\.(?:attn\.)?"
    r"(?P<which>k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale)$")


def resolve_kv_cache_dtype(value: str | None) -> str:
    """'auto' or 'fp8' from a user's kv_cache_dtype; ValueError naming the options."""
    key = "auto" if value is None else str(value).lower()
    if key not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={value!r} is not supported; use one of "
                         f"{', '.join(KV_CACHE_DTYPES)} (auto: the model dtype).")
    return "fp8" if key.startswith("fp8") else "auto"


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the cache tensors."""
    return torch.float8_e4m3fn if kv_cache_dtype == "fp8" else model_dtype


class KVScaleLoader:
    """Takes the KV cache scales out of a checkpoint stream into the attention layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.loaded = 0

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether `name` is a KV cache scale (then it is stored, not passed on)."""
        m = _SCALE_NAME.match(name)
        if m is None:
            return False
        try:
            attn = self.model.get_submodule(m["layer"] + ".attn")
        except AttributeError:
            logger.warning("Checkpoint KV cache scale %s has no attention layer; ignored.", name)
            return True
        value = float(tensor.float().max())
        which = m["which"]
        with torch.no_grad():
            if which in ("k_scale", "kv_scale", "k_proj.output_scale"):
                attn.k_scale.fill_(value)
            if which in ("v_scale", "kv_scale", "v_proj.output_scale"):
                attn.v_scale.fill_(value)
        attn.kv_scales_from_checkpoint = True
        self.loaded += 1
        return True

    def wrap(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[
            tuple[str, torch.Tensor]]:
        """The stream without its KV cache scales (taken here)."""
        for name, tensor in weights:
            if not self.take(name, tensor):
                yield name, tensor
        self.finish()

    def finish(self) -> None:
        if self.loaded:
            logger.info("Loaded %d KV cache scales from the checkpoint", self.loaded)


def check_kv_cache_scales(model: nn.Module, kv_cache_dtype: str) -> None:
    """Warn where an FP8 cache runs with unit scales (none in the checkpoint)."""
    if kv_cache_dtype != "fp8":
        return
    from pagedllm.models.layers.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if layers and not any(getattr(m, "kv_scales_from_checkpoint", False) for m in layers):
        logger.warning("kv_cache_dtype='fp8': the checkpoint has no k_scale / v_scale; using "
                       "1.0 (keys and values beyond +-448 saturate, small ones lose "
                       "precision).")
