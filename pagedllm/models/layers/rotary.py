"""Rotary position embeddings (neox / rotate-half style) with llama3, linear, dynamic and
longrope (Phi-3 "su") scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedllm.cpu_kernels import ops as cpu_ops
from pagedllm.models.layers import fused_ops

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic", "longrope")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """Read rope settings from either `rope_theta`/`rope_scaling` or transformers-5
    `rope_parameters`, returning one dict with at least rope_type and rope_theta."""
    params: dict[str, Any] = {}
    new_style = getattr(hf_config, "rope_parameters", None)
    if isinstance(new_style, dict):
        params.update(new_style)
    scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(scaling, dict):
        for key, value in scaling.items():
            params.setdefault(key, value)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = "longrope" if rope_type == "su" else rope_type
    return params


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor = p["factor"]
    low_freq_factor = p.get("low_freq_factor", 1.0)
    high_freq_factor = p.get("high_freq_factor", 4.0)
    old_len = p.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope(inv_freq: torch.Tensor, p: dict[str, Any], hf_config: Any, max_model_len: int,
              rotary_dim: int) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-frequency divisors (the long set when contexts beyond the original
    training length are served, else the short set) and the cos/sin magnitude scale.

    HF switches sets by the current sequence length and recomputes the cache; a paged cache
    cannot, so the set is chosen once from max_model_len (identical to HF for every sequence
    when max_model_len <= original_max_position_embeddings)."""
    orig = p.get("original_max_position_embeddings") or getattr(
        hf_config, "original_max_position_embeddings", None)
    if not orig or "short_factor" not in p or "long_factor" not in p:
        raise ValueError("rope_type 'longrope' needs short_factor, long_factor and "
                         "original_max_position_embeddings in the rope settings of config.json.")
    factors = p["long_factor"] if max_model_len > orig else p["short_factor"]
    if len(factors) != rotary_dim // 2:
        raise ValueError(f"longrope factors have {len(factors)} entries; the rotary dimension "
                         f"{rotary_dim} needs {rotary_dim // 2}.")
    factor = p.get("factor") or hf_config.max_position_embeddings / orig
    mscale = p.get("attention_factor")
    if mscale is None:
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return inv_freq / torch.tensor(factors, dtype=torch.float32), float(mscale)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to flat q/k of shape [num_tokens, heads * head_dim]."""

    def __init__(self, head_dim: int, max_position: int, hf_config: Any,
                 rotary_dim: int | None = None, params: dict[str, Any] | None = None,
                 max_model_len: int | None = None) -> None:
        """`params` overrides the config's rope settings (per-layer rope, Gemma 3);
        `max_model_len` (default max_position) picks longrope's short or long factors."""
        super().__init__()
        p = dict(params) if params is not None else rope_parameters(hf_config)
        p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
        if p["rope_type"] == "su":
            p["rope_type"] = "longrope"
        rope_type = p["rope_type"]
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        self.head_dim = head_dim
        self.use_fused = fused_ops.enabled()
        self.rotary_dim = rotary_dim or head_dim
        base = float(p["rope_theta"])
        positions = torch.arange(max_position, dtype=torch.float32)
        orig_max = getattr(hf_config, "max_position_embeddings", max_position)
        if rope_type == "dynamic" and max_position > orig_max:
            # Static NTK scaling for the longest context served; shorter contexts configured
            # within the original window keep the plain frequencies, as HF does there.
            factor = p["factor"]
            scale = (factor * max_position / orig_max) - (factor - 1)
            base = base * scale ** (self.rotary_dim / (self.rotary_dim - 2))
        inv_freq = _default_inv_freq(base, self.rotary_dim)
        mscale = 1.0
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, p)
        elif rope_type == "linear":
            positions = positions / p["factor"]
        elif rope_type == "longrope":
            inv_freq, mscale = _longrope(inv_freq, p, hf_config, max_model_len or max_position,
                                         self.rotary_dim)
        freqs = torch.outer(positions, inv_freq)
        self.register_buffer("cos_cache", freqs.cos() * mscale, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * mscale, persistent=False)
        # The last CPU step's (positions, cos, sin) in the activation dtype: layers that
        # share this module (equal tables) gather them once per step.
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_dim)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        c = cos.to(x.dtype)
        s = sin.to(x.dtype)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.reshape(num_tokens, -1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k); on CUDA, and for bf16 neighbouring q / k on the CPU, rotated in
        place (q and k may be views of a qkv output)."""
        if self.use_fused and fused_ops.usable(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            fused_ops.rotary_inplace(positions, q, k, self.cos_cache, self.sin_cache,
                                     self.head_dim, self.rotary_dim)
            return q, k
        if self.rotary_dim == self.head_dim and cpu_ops.usable(q) and _adjacent(q, k):
            kernels = cpu_ops.get()
            if kernels is not None:  # bf16 on the CPU: in place, one C call, same rounding
                cos, sin = self._full_cos_sin(positions, q.dtype)
                qk = q.as_strided((q.shape[0], q.shape[-1] + k.shape[-1]), q.stride())
                kernels.rope_inplace(qk, cos, sin, self.head_dim)
                return q, k
        return self.forward_native(positions, q, k)

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch reference of forward() (returns new tensors)."""
        if self.rotary_dim != self.head_dim or q.is_cuda:
            cos = self.cos_cache.index_select(0, positions).unsqueeze(1)
            sin = self.sin_cache.index_select(0, positions).unsqueeze(1)
            return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        cos, sin = self._full_cos_sin(positions, q.dtype)
        n, qw, kw = q.shape[0], q.shape[-1], k.shape[-1]
        if _adjacent(q, k):
            # q and k are neighbouring column blocks of one qkv output: rotate them together
            qk = self._rotate_full(q.as_strided((n, qw + kw), q.stride()), cos, sin)
            return qk[:, :qw], qk[:, qw:]
        return self._rotate_full(q, cos, sin), self._rotate_full(k, cos, sin)

    def _full_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin over the whole head ([n, 1, head_dim], `dtype`) for
        x * cos + swap_halves(x) * sin; cached for the step's positions tensor."""
        step = self._step
        if step is not None and step[0] is positions and step[1].dtype == dtype:
            return step[1], step[2]
        cos = self.cos_cache.index_select(0, positions)
        sin = self.sin_cache.index_select(0, positions)
        cos_full = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1)
        sin_full = torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1)
        self._step = (positions, cos_full, sin_full)
        return cos_full, sin_full

    def _rotate_full(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> torch.Tensor:
        """Rotate every head of x [n, heads * head_dim] (rotary_dim == head_dim): the same
        products as `_rotate` (x1 c - x2 s, x2 c + x1 s), in three ops."""
        n = x.shape[0]
        x = x.view(n, -1, self.head_dim)
        x1, x2 = x.chunk(2, dim=-1)
        out = x * cos + torch.cat((x2, x1), dim=-1) * sin
        return out.view(n, -1)


def _adjacent(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether q and k are neighbouring column blocks of one 2-D tensor (a qkv output)."""
    return (q.stride() == k.stride() and q.stride(-1) == 1
            and k.data_ptr() == q.data_ptr() + q.shape[-1] * q.element_size())
