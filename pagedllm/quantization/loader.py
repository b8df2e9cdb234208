"""Quantized linear layers at load time, through the same `packed` mechanism as GGUF's.

`QuantizedLoader` takes the model's tensor-parallel linear layers (`ColumnParallelLinear`,
`RowParallelLinear` and their fused kinds; not the embedding, LM head, norms, routers or
expert stacks, which stay in the model dtype):

1. `prepare` (checkpoint formats): drops the dense `weight` of each quantized layer, so the
   model's `load_weights` neither allocates nor expects it;
2. `wrap` the checkpoint's tensor stream: a quantized layer's tensors (``weight`` e4m3 +
   ``weight_scale`` (+ ``input_scale``); ``qweight`` / ``qzeros`` / ``scales`` (+
   ``g_idx``)) are taken out of the stream into the layer's canonical form, each piece of a
   fused layer (q / k / v, gate / up) placed by the layer's own `weight_loader` (so the
   tensor-parallel slicing is the dense one's); KV cache scales go to the attention layers;
   the rest reaches `load_weights` as before;
3. once a layer has all its pieces it is built at once: a `Fp8Weight` / `Int4Weight`
   attached as `layer.packed` (`layers/quantized.attach_packed`), or, where the device has no
   kernel for the format (`QuantSpec.dequantize`), a dense `weight` in the model dtype;
4. `finish` checks that every layer was complete, and quantizes the dense layers of
   ``quantization="fp8"`` (weights from a bf16 / fp16 checkpoint or dummy ones).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagedllm.models.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.models.layers.quantized import attach_packed
from pagedllm.quantization import int4
from pagedllm.quantization.fp8 import (
    FP8_DTYPE,
    Fp8Weight,
    fast_accum_default,
    quantize_rows,
    scaled_mm_mode,
)
from pagedllm.quantization.kv_cache import KVScaleLoader
from pagedllm.quantization.spec import QuantSpec

logger = logging.getLogger(__name__)

_SUFFIXES = {
    "fp8": ("weight", "weight_scale", "input_scale"),
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
}
_ALL_QUANT_SUFFIXES = {"weight_scale", "input_scale", "qweight", "qzeros", "scales", "g_idx",
                       "weight_scale_inv"}
FUSED_INPUT_QUANT_ENV = "PAGEDLLM_FP8_FUSED_INPUT"  # "0": each FP8 linear quantizes its input
_STACK_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                "gate_up_proj": ("gate_proj", "up_proj")}


def _shards(module: nn.Module) -> tuple[Any, ...]:
    if isinstance(module, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(module, MergedColumnParallelLinear):
        return tuple(range(len(module.shard_sizes)))
    return (None,)


def _hf_names(module_name: str, module: nn.Module) -> list[str]:
    """The checkpoint's module names of a layer's pieces (HF naming, with 'model.')."""
    stem, _, last = module_name.rpartition(".")
    pieces = _STACK_NAMES.get(last) if len(_shards(module)) > 1 else None
    names = [f"{stem}.{p}" for p in pieces] if pieces else [module_name]
    return ["model." + n for n in names]


@dataclass
class _Layer:
    """A quantized layer being loaded: its canonical tensors, filled piece by piece."""

    module: nn.Module
    shape: tuple[int, int]  # this rank's [out, in]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: set[tuple[Any, str]] = field(default_factory=set)
    input_scales: list[float] = field(default_factory=list)


class QuantizedLoader:
    """Loads one model's quantized linear layers (see the module docstring)."""

    def __init__(self, model: nn.Module, spec: QuantSpec, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.kind = "fp8" if spec.weight == "fp8" else spec.method
        self.kv_scales = KVScaleLoader(model)
        self.layers: dict[str, _Layer] = {}
        self.built = 0
        self.mode = None if spec.dequantize else self._mode()
        self.fast_accum = fast_accum_default(device)
        for name, module in model.named_modules():
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                continue
            if getattr(module, "packed", None) is not None or module.weight is None:
                continue
            ignored = [spec.ignores(n) for n in _hf_names(name, module)]
            if all(ignored):
                continue
            if any(ignored):
                raise ValueError(f"The checkpoint quantizes only some pieces of the fused layer "
                                 f"{name} ({_hf_names(name, module)}); pagedllm cannot load it.")
            self.layers[name] = _Layer(module, tuple(module.weight.shape))
        if not self.layers:
            raise ValueError(f"quantization {spec.method!r}: the model has no linear layers "
                             "that pagedllm quantizes.")
        if spec.weight == "int4":
            for name, layer in self.layers.items():
                k = layer.shape[1]
                group = k if spec.group_size == -1 else spec.group_size
                if k % group:
                    raise ValueError(f"{name} has {k} inputs, not a multiple of the "
                                     f"checkpoint's group_size {group}.")

    def _mode(self) -> str | None:
        if self.spec.weight != "fp8":
            return None
        return scaled_mm_mode(self.device, self.dtype)

    # ------------------------------------------------------------------ stages
    def prepare(self) -> None:
        """Checkpoint formats: the quantized layers' dense weights are not allocated."""
        if self.spec.from_checkpoint:
            for layer in self.layers.values():
                layer.module.register_parameter("weight", None)

    def wrap(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[
            tuple[str, torch.Tensor]]:
        """The checkpoint stream without the quantized layers' tensors (taken here)."""
        for name, tensor in weights:
            if self.kv_scales.take(name, tensor):
                continue
            if not self.spec.from_checkpoint:
                yield name, tensor
                continue
            param_name, shard = self.model.checkpoint_name(name.removeprefix("model."))
            module_name, _, suffix = param_name.rpartition(".")
            layer = self.layers.get(module_name)
            if layer is None:
                if suffix in _ALL_QUANT_SUFFIXES or tensor.dtype == FP8_DTYPE:
                    raise ValueError(
                        f"Checkpoint tensor {name} is quantized, but pagedllm keeps "
                        f"{module_name or name} in {str(self.dtype).removeprefix('torch.')} "
                        f"(only the linear layers of attention and dense MLPs are quantized).")
                yield name, tensor
                continue
            if suffix not in _SUFFIXES[self.kind]:
                if suffix == "bias":
                    yield name, tensor
                    continue
                raise ValueError(f"Checkpoint tensor {name} is not part of a {self.spec.method} "
                                 f"layer (expected {', '.join(_SUFFIXES[self.kind])}).")
            if shard is None and len(_shards(layer.module)) > 1:
                raise ValueError(f"Checkpoint tensor {name} is a fused quantized layer; "
                                 "pagedllm loads quantized q/k/v and gate/up as separate "
                                 "tensors only.")
            self._take(module_name, layer, shard, suffix, tensor)

    def finish(self) -> None:
        """Check that every quantized layer is complete; quantize the dense ones (fp8)."""
        self.kv_scales.finish()
        if not self.spec.from_checkpoint:
            for name, layer in list(self.layers.items()):
                self._build_online(name, layer)
        if self.layers:
            name, layer = next(iter(self.layers.items()))
            missing = sorted(f"{s}.{k}" for s, k in self._expected(layer) - layer.seen)
            raise ValueError(f"The checkpoint lacks tensors of {len(self.layers)} quantized "
                             f"layers, e.g. {name}: {missing[:4]}; is it complete?")
        how = "dequantized at load to " + str(self.dtype).removeprefix("torch.") \
            if self.spec.dequantize else "kept quantized"
        logger.info("Quantization %s: %d linear layers %s", self.spec.label, self.built, how)
        if self.kind == "fp8" and not self.spec.dequantize:
            linked = link_fp8_inputs(self.model)
            if linked:
                logger.info("FP8: %d norms / activations quantize the rows they hand to "
                            "their linear", linked)

    def init_dummy(self, seed: int) -> None:
        """Random weights in the quantized form (benchmarks), as a real load would leave them."""
        gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        for name, layer in list(self.layers.items()):
            n, k = layer.shape
            dense = torch.empty(n, k, device=self.device).uniform_(-1e-3, 1e-3, generator=gen)
            if self.kind == "fp8":
                codes, scale = quantize_rows(dense)
                layer.tensors = {"codes": codes, "scale": scale.reshape(-1, 1)}
                layer.input_scales = [0.01]
            else:
                group = k if self.spec.group_size == -1 else self.spec.group_size
                del dense
                layer.tensors = {
                    "codes": torch.randint(0, 16, (n, k), generator=gen, device=self.device,
                                           dtype=torch.uint8),
                    "zeros": torch.full((n, k // group), 8, dtype=torch.uint8,
                                        device=self.device),
                    "scales": (torch.empty(n, k // group, device=self.device)
                               .uniform_(0.5e-4, 1.5e-4, generator=gen).half()),
                }
            self._build(name, layer)

    # ----------------------------------------------------------------- pieces
    def _expected(self, layer: _Layer) -> set[tuple[Any, str]]:
        kinds = list(_SUFFIXES[self.kind])
        if self.kind == "fp8" and self.spec.activation != "static":
            kinds.remove("input_scale")
        return {(s, k) for s in _shards(layer.module) for k in kinds}

    def _tensor(self, layer: _Layer, key: str, shape: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:
        t = layer.tensors.get(key)
        if t is None:
            t = layer.tensors[key] = torch.zeros(shape, dtype=dtype, device=self.device)
        return t

    def _rows(self, layer: _Layer, dst: torch.Tensor, src: torch.Tensor, shard: Any) -> None:
        """Per-output-row data [rows of the piece, X] into dst, sliced like the weight."""
        if isinstance(layer.module, RowParallelLinear):
            if dst.shape != src.shape:
                raise ValueError(f"Checkpoint tensor of shape {tuple(src.shape)}, the layer "
                                 f"expects {tuple(dst.shape)}.")
            dst.copy_(src)
        else:
            layer.module.weight_loader(dst, src, shard)

    def _take(self, name: str, layer: _Layer, shard: Any, suffix: str,
              tensor: torch.Tensor) -> None:
        if (shard, suffix) in layer.seen:
            raise ValueError(f"The checkpoint has {name}.{suffix} (piece {shard}) twice.")
        layer.seen.add((shard, suffix))
        n, k = layer.shape
        if self.kind == "fp8":
            self._take_fp8(layer, shard, suffix, tensor, n, k)
        else:
            self._take_int4(layer, shard, suffix, tensor, n, k)
        if layer.seen >= self._expected(layer):
            self._build(name, layer)

    def _take_fp8(self, layer: _Layer, shard: Any, suffix: str, t: torch.Tensor, n: int,
                  k: int) -> None:
        if suffix == "weight":
            if t.dtype != FP8_DTYPE:
                raise ValueError(f"A weight of an FP8 layer is {t.dtype}, not {FP8_DTYPE}; the "
                                 "checkpoint does not match its quantization_config.")
            layer.module.weight_loader(self._tensor(layer, "codes", (n, k), FP8_DTYPE), t, shard)
        elif suffix == "weight_scale":
            scale = self._tensor(layer, "scale", (n, 1), torch.float32)
            if t.numel() == 1:  # per tensor: every row of the piece
                offset, size = layer.module.piece_rows(shard)
                scale.narrow(0, offset, size).fill_(float(t.reshape(())))
            else:
                self._rows(layer, scale, t.float().reshape(-1, 1), shard)
        else:
            layer.input_scales.append(float(t.float().max()))

    def _take_int4(self, layer: _Layer, shard: Any, suffix: str, t: torch.Tensor, n: int,
                   k: int) -> None:
        group = k if self.spec.group_size == -1 else self.spec.group_size
        groups = k // group
        if suffix == "g_idx":
            g = t.to(device=self.device, dtype=torch.long)
            old = layer.tensors.get("g_idx")
            if old is not None and not torch.equal(old, g):
                raise ValueError("The pieces of a fused layer have different g_idx (act-order "
                                 "permutations); pagedllm needs them equal.")
            if g.shape != (k,) or int(g.min()) < 0 or int(g.max()) >= groups:
                raise ValueError(f"g_idx has shape {tuple(g.shape)} / groups out of range for "
                                 f"a layer of {k} inputs in {groups} groups.")
            layer.tensors["g_idx"] = g
            return
        t = t.to(self.device)
        if suffix == "qweight":
            codes = (int4.unpack_awq(t) if self.kind == "awq"
                     else int4.unpack_gptq_qweight(t))
            self._rows(layer, self._tensor(layer, "codes", (n, k), torch.uint8), codes, shard)
            return
        if suffix == "qzeros":
            zeros = (int4.unpack_awq(t) if self.kind == "awq"
                     else int4.unpack_gptq_qzeros(t, self.spec.zero_offset))
            self._rows(layer, self._tensor(layer, "zeros", (n, groups), torch.uint8), zeros,
                       shard)
            return
        self._rows(layer, self._tensor(layer, "scales", (n, groups), torch.float16),
                   t.t().to(torch.float16), shard)

    # ------------------------------------------------------------------ build
    def _build(self, name: str, layer: _Layer) -> None:
        """The finished layer: a packed weight, or a dense one (dequantize)."""
        t = layer.tensors
        module = layer.module
        if self.kind == "fp8":
            if self.spec.dequantize:
                dense = t["codes"].float() * t["scale"]
            else:
                static = (torch.tensor([max(layer.input_scales)], device=self.device)
                          if self.spec.activation == "static" else None)
                packed: nn.Module = Fp8Weight(t["codes"], t["scale"].reshape(-1), self.dtype,
                                              self.mode, static, self.fast_accum)
        else:
            g_idx = t.get("g_idx")
            if self.spec.dequantize:
                dense = int4.dequantize(t["codes"], t["zeros"], t["scales"], g_idx)
            else:
                packed = int4.Int4Weight(t["codes"], t["zeros"], t["scales"], g_idx, self.dtype)
        if self.spec.dequantize:
            module.weight = nn.Parameter(dense.to(self.dtype), requires_grad=False)
        else:
            attach_packed(module, packed)
        del self.layers[name]
        self.built += 1

    def _build_online(self, name: str, layer: _Layer) -> None:
        codes, scale = quantize_rows(layer.module.weight.data)
        attach_packed(layer.module, Fp8Weight(codes, scale, self.dtype, self.mode,
                                              fast_accum=self.fast_accum))
        del self.layers[name]
        self.built += 1


def link_fp8_inputs(model: nn.Module) -> int:
    """Let each kernel that feeds one FP8 linear with dynamic activation scales (the model's
    `fp8_input_pairs`: RMSNorm before q/k/v and gate/up, SiLU-and-mul before down) hand it
    the rows already quantized, saving a pass over them per linear. Off with
    PAGEDLLM_FP8_FUSED_INPUT=0. Returns how many producers were linked."""
    if os.environ.get(FUSED_INPUT_QUANT_ENV, "1") == "0":
        return 0
    linked = 0
    for module in model.modules():
        pairs = getattr(module, "fp8_input_pairs", None)
        for producer, linear in pairs() if callable(pairs) else ():
            packed = getattr(linear, "packed", None)
            if (isinstance(packed, Fp8Weight) and packed.input_scale is None
                    and hasattr(producer, "fp8_output_for")):
                producer.fp8_output_for = packed.takes_quantized
                linked += 1
    return linked
