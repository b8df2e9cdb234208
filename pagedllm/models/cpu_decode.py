"""A straight-line decode forward for Llama-structured models in bf16 on the CPU.

At one token per request the module forward of a small model costs more in Python (16
module calls per layer, their shape and dtype checks, views) than its fused kernels take.
`CpuDecodePath` is built once from a loaded model whose every part is the plain Llama one
(`build` returns None otherwise): it keeps, per layer, the norm weights, each linear layer's
matmul as one callable on the packed (or dense bf16) weight, and the attention settings,
and runs a decode-only step as a loop of those calls and the fused CPU kernels
(`pagedllm.cpu_kernels`). Its result is bit for bit the module forward's, which handles
every other step (prefill, mixed batches) and every other model. It holds the weights it
was built from: `LlamaForCausalLM.load_weights` drops it, to be rebuilt at the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.backends.abstract import AttentionMetadata
from pagedllm.attention.backends.torch_sdpa import TorchSDPAImpl
from pagedllm.cpu_kernels import ops as cpu_ops
from pagedllm.models.layers.activation import SiluAndMul
from pagedllm.models.layers.layernorm import RMSNorm
from pagedllm.models.layers.quantized import PackedWeight
from pagedllm.models.layers.rotary import RotaryEmbedding

Matmul = Callable[[torch.Tensor], torch.Tensor]


def matmul_of(linear: nn.Module) -> Matmul | None:
    """x W^T for a 2-D bf16 x, straight to the kernel of `linear`'s weight: packed int4 /
    int8 in bf16 (GGUF), or a dense bf16 weight; None for anything else (bias, tensor
    parallel, other quantizations)."""
    if getattr(linear, "bias", None) is not None or linear.tp.world_size != 1:
        return None
    packed = getattr(linear, "packed", None)
    if packed is None:
        weight = linear.weight
        if weight is None or weight.dtype is not torch.bfloat16 or weight.device.type != "cpu":
            return None
        return partial(F.linear, weight=weight)
    if type(packed) is not PackedWeight or packed.dtype is not torch.bfloat16:
        return None
    if packed.kind == "int4t":  # the kernel's own call where no padding is cut off
        return packed.tile_matmul if packed.out_features % 16 == 0 else packed.forward
    if packed.kind == "int4":
        return partial(torch.ops.aten._weight_int4pack_mm_for_cpu, mat2=packed.codes,
                       qGroupSize=packed.group_size, qScaleAndZeros=packed.scales)
    return partial(torch._weight_int8pack_mm, mat2=packed.codes, scales=packed.scales)


@dataclass(frozen=True)
class _Layer:
    """What one decoder layer's decode step needs (norm weights as addresses, the tensors
    kept alive in `weights`)."""

    norm1: int
    eps1: float
    qkv: Matmul
    o: Matmul
    norm2: int
    eps2: float
    gate_up: Matmul
    down: Matmul
    scale: float
    window: int  # 0: none
    weights: tuple[torch.Tensor, ...]
    attend: Callable[..., torch.Tensor] | None  # SDPA's (impl.forward) when not fused


def _norm_ok(norm: Any, kernels: cpu_ops.CpuKernels) -> bool:
    return (type(norm) is RMSNorm and norm.weight.dtype is torch.bfloat16
            and norm.weight.is_contiguous() and kernels.norm_exact(norm.weight.shape[0]))


class CpuDecodePath:
    """The decode-only forward of a Llama-structured bf16 CPU model (see the module doc)."""

    def __init__(self, model: nn.Module, layers: list[_Layer], rotary: RotaryEmbedding,
                 kernels: cpu_ops.CpuKernels) -> None:
        attn = model.layers[0].self_attn
        self._embed = model.embed
        self._hidden = model.norm.weight.shape[0]
        self._final_weight = model.norm.weight  # kept alive: its address goes to C
        self._final_norm = model.norm.weight.data_ptr()
        self._final_eps = model.norm.eps
        self._cache_ptrs: list[int] = []  # the addresses of the caches last checked
        self._layers = layers
        self._rotary = rotary
        self._kernels = kernels
        self._num_heads = attn.num_heads
        self._num_kv_heads = attn.num_kv_heads
        self._head_dim = attn.head_dim
        self._q_size = attn.q_size
        self._kv_size = attn.kv_size

    @classmethod
    def build(cls, model: nn.Module) -> CpuDecodePath | None:
        """The path for `model` (a loaded LlamaForCausalLM), or None where any part of it is
        not the plain Llama one this path reproduces, or the fused kernels are missing."""
        from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

        kernels = cpu_ops.get()
        if kernels is None or not _norm_ok(model.norm, kernels):
            return None
        rotary = None
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if (type(layer) is not LlamaDecoderLayer or type(attn) is not LlamaAttention
                    or type(mlp) is not LlamaMLP or type(mlp.act_fn) is not SiluAndMul
                    or not _norm_ok(layer.input_layernorm, kernels)
                    or not _norm_ok(layer.post_attention_layernorm, kernels)):
                return None
            impl = attn.attn.impl
            if (type(impl) is not TorchSDPAImpl or not impl.fused_decode_supported
                    or type(attn.rotary_emb) is not RotaryEmbedding
                    or attn.rotary_emb.rotary_dim != attn.head_dim
                    or (rotary is not None and attn.rotary_emb is not rotary)):
                return None
            rotary = attn.rotary_emb
            mms = [matmul_of(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                           mlp.down_proj)]
            if any(m is None for m in mms):
                return None
            w1, w2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            layers.append(_Layer(
                w1.data_ptr(), layer.input_layernorm.eps, mms[0], mms[1], w2.data_ptr(),
                layer.post_attention_layernorm.eps, mms[2], mms[3], impl.scale,
                impl.sliding_window or 0, (w1, w2),
                None if kernels.fused_attention else impl.forward))
        if rotary is None:
            return None
        return cls(model, layers, rotary, kernels)

    @staticmethod
    def applies(input_ids: torch.Tensor, kv_caches: list[torch.Tensor],
                md: AttentionMetadata) -> bool:
        """Whether this step is one the path runs: decode-only, one token per request, a
        bf16 cache on the CPU."""
        return (md.is_decode_only and input_ids.shape[0] == md.num_reqs
                and bool(kv_caches) and kv_caches[0].dtype is torch.bfloat16
                and kv_caches[0].device.type == "cpu")

    def _check_caches(self, kv_caches: list[torch.Tensor], ptrs: list[int]) -> None:
        """The layout the kernels assume, checked once per set of cache tensors."""
        d, hkv = self._head_dim, self._num_kv_heads
        if len(kv_caches) != len(self._layers) or any(
                c.dtype is not torch.bfloat16 or not c.is_contiguous() or c.dim() != 5
                or c.shape[0] != 2 or c.shape[3:] != (hkv, d)
                or c.shape[1:3] != kv_caches[0].shape[1:3] for c in kv_caches):
            raise ValueError("CpuDecodePath needs one contiguous bf16 cache per layer, "
                             "[2, blocks, block_size, kv_heads, head_dim], all alike.")
        self._cache_ptrs = ptrs

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[torch.Tensor], md: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [R, hidden] of a decode-only step (see `applies`).

        Every tensor the C calls read or write is made here by torch ops of known layouts
        (contiguous bf16 rows) or checked: the embeddings and the step's inputs per step,
        the caches whenever their addresses change."""
        k = self._kernels
        norm, rope, silu, decode = k.raw_norm, k.raw_rope, k.raw_silu, k.raw_decode
        lanes, empty, bf16 = k.sum_lanes, torch.empty, torch.bfloat16
        hidden = self._embed(input_ids)
        n, h = hidden.shape
        if hidden.dtype is not bf16 or not hidden.is_contiguous() or h != self._hidden:
            raise ValueError("CpuDecodePath runs contiguous bf16 activations only.")
        hq, hkv, d = self._num_heads, self._num_kv_heads, self._head_dim
        qs, kvs = self._q_size, self._kv_size
        width = qs + 2 * kvs
        cos, sin = self._rotary._full_cos_sin(positions, bf16)
        ptrs = [c.data_ptr() for c in kv_caches]
        if ptrs != self._cache_ptrs:
            self._check_caches(kv_caches, ptrs)
        cache = kv_caches[0]
        if positions.shape[0] != n or md.num_reqs != n:
            raise ValueError("CpuDecodePath: the step's rows do not match its tokens.")
        block_size, plane = cache.shape[2], cache.stride(0) * cache.element_size()
        if k.fused_attention:
            step = cpu_ops.DecodeStep.of_step(md, cache)
            bt, bt_stride, lens, slots = (step.block_table, step.block_table_stride,
                                          step.seq_lens, step.slots)
        cos_p, sin_p = cos.data_ptr(), sin.data_ptr()
        residual = hidden
        x = empty((n, h), dtype=bf16)
        norm(hidden.data_ptr(), h, None, 0, self._layers[0].norm1, x.data_ptr(), None, n, h,
             self._layers[0].eps1, lanes)
        for i, (layer, kv) in enumerate(zip(self._layers, kv_caches)):
            if i:
                x, res = empty((n, h), dtype=bf16), empty((n, h), dtype=bf16)
                norm(hidden.data_ptr(), h, residual.data_ptr(), h, layer.norm1, x.data_ptr(),
                     res.data_ptr(), n, h, layer.eps1, lanes)
                residual = res
            qkv = layer.qkv(x)
            q = qkv.data_ptr()
            rope(q, width, cos_p, sin_p, n, hq + hkv, d)
            if layer.attend is None:
                attn = empty((n, qs), dtype=bf16)
                base = kv.data_ptr()
                decode(q, width, q + 2 * qs, width, q + 2 * (qs + kvs), width, base,
                       base + plane, bt, bt_stride, lens, slots, attn.data_ptr(), n, hq, hkv,
                       d, block_size, layer.scale, layer.window)
            else:  # PAGEDLLM_CPU_KERNELS=exact: the backend's SDPA path, as the modules
                attn = layer.attend(qkv[:, :qs].view(n, hq, d),
                                    qkv[:, qs:qs + kvs].view(n, hkv, d),
                                    qkv[:, qs + kvs:].view(n, hkv, d), kv,
                                    md).reshape(n, qs).contiguous()
            o = layer.o(attn)
            x, res = empty((n, h), dtype=bf16), empty((n, h), dtype=bf16)
            norm(o.data_ptr(), h, residual.data_ptr(), h, layer.norm2, x.data_ptr(),
                 res.data_ptr(), n, h, layer.eps2, lanes)
            residual = res
            gate_up = layer.gate_up(x)
            inter = gate_up.shape[1] // 2
            act = empty((n, inter), dtype=bf16)
            silu(gate_up.data_ptr(), 2 * inter, act.data_ptr(), n, inter)
            hidden = layer.down(act)
        out, res = empty((n, h), dtype=bf16), empty((n, h), dtype=bf16)
        norm(hidden.data_ptr(), h, residual.data_ptr(), h, self._final_norm, out.data_ptr(),
             res.data_ptr(), n, h, self._final_eps, lanes)
        return out
