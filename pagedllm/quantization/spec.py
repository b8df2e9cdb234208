"""What a model's quantization is: the user's `quantization=` and the checkpoint's
`quantization_config`, checked once at engine construction into a `QuantSpec`.

Methods (`QUANTIZATION_METHODS`):

* ``gguf``: a GGUF file's quantized weights kept packed for the CPU kernels
  (`models/loader/gguf_loader.load_packed_gguf`; no `QuantSpec`).
* ``fp8``: from a bf16 / fp16 checkpoint, weights quantized at load to e4m3 with one scale
  per output channel, activations per token at run time; or an FP8 checkpoint of the
  ``fp8`` method (``activation_scheme`` static / dynamic, per-tensor weight scales).
* ``compressed-tensors``: an FP8 checkpoint in the ``float-quantized`` format (weight
  scales per channel or per tensor; activations static per tensor or dynamic per token).
* ``awq`` / ``gptq``: 4-bit weight-only checkpoints (W4A16), any group size, GPTQ with or
  without act-order (``desc_act``: ``g_idx``), GPTQ's v1 (zeros stored minus one) and v2
  formats.

Where the device has no kernel for the format (the CPU; a GPU below compute capability 8.9
for FP8) a checkpoint's weights are dequantized at load (`dequantize`) and the model runs
in its dtype, so the output is the dequantized checkpoint's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("gguf", "fp8", "compressed-tensors", "awq", "gptq")
CHECKPOINT_METHODS = ("fp8", "compressed-tensors", "awq", "gptq")
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class QuantSpec:
    """A checked quantization setting of the engine's linear layers."""

    method: str  # fp8, compressed-tensors, awq or gptq
    weight: str  # "fp8" (e4m3) or "int4"
    from_checkpoint: bool = True  # False: fp8 computed at load from a dense checkpoint
    weight_scale: str = "channel"  # fp8 checkpoints: "channel" or "tensor"
    activation: str | None = None  # fp8: "dynamic" (per token) or "static" (per tensor)
    group_size: int = 128  # int4: input features per (scale, zero); -1: all of them
    desc_act: bool = False  # GPTQ act-order (g_idx)
    zero_offset: int = 0  # GPTQ v1 stores zero - 1: the offset added back
    ignore: tuple[str, ...] = ()  # module names (HF) left unquantized
    dequantize: bool = False  # dense at load (no kernel here for the format)

    @property
    def label(self) -> str:
        """How the start-up log names the setting."""
        if self.weight == "int4":
            extra = ", act-order" if self.desc_act else ""
            return f"{self.method} W4A16, group {self.group_size}{extra}"
        source = "checkpoint" if self.from_checkpoint else "computed at load"
        act = self.activation or "dynamic"
        return f"{self.method} (FP8 weights {source}, {self.weight_scale} scales, {act} " \
               "activation scales)"

    def ignores(self, hf_module: str) -> bool:
        """Whether HF module name `hf_module` (e.g. 'model.layers.0.mlp.down_proj') stays
        unquantized by the checkpoint's ignore list."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                import re

                if re.match(pattern[3:], hf_module):
                    return True
            elif hf_module == pattern or hf_module.endswith("." + pattern) or (
                    hf_module.removeprefix("model.") == pattern.removeprefix("model.")):
                return True
        return False


def checkpoint_quantization_config(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's `quantization_config` from config.json as a dict (None: none)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        to_dict = getattr(qc, "to_dict", None)
        qc = to_dict() if callable(to_dict) else vars(qc)
    return dict(qc)


def parse_checkpoint_quantization(qc: dict[str, Any]) -> QuantSpec:
    """A checkpoint's `quantization_config` as a QuantSpec; ValueError naming the method (and
    the setting) where it is not supported."""
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method == "fp8":
        return _parse_fp8(qc)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc)
    if method in ("awq", "gptq"):
        return _parse_int4(method, qc)
    raise ValueError(
        f"The checkpoint's quantization_config has quant_method={qc.get('quant_method')!r}, "
        f"which pagedllm does not support; supported checkpoint methods: "
        f"{', '.join(CHECKPOINT_METHODS)}.")


def _parse_fp8(qc: dict[str, Any]) -> QuantSpec:
    if qc.get("weight_block_size"):
        raise ValueError(
            "The checkpoint's quantization_config (quant_method 'fp8') has weight_block_size="
            f"{qc['weight_block_size']} (block-wise FP8), which pagedllm does not support; "
            "per-tensor and per-channel FP8 checkpoints are supported.")
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("static", "dynamic"):
        raise ValueError(f"quantization_config (quant_method 'fp8') has activation_scheme="
                         f"{scheme!r}; supported: static, dynamic.")
    ignore = tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
    return QuantSpec("fp8", "fp8", weight_scale="tensor", activation=scheme, ignore=ignore)


def _parse_compressed_tensors(qc: dict[str, Any]) -> QuantSpec:
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("The checkpoint's quantization_config (compressed-tensors) has no "
                         "config_groups.")
    schemes = []
    for name, group in groups.items():
        weights = group.get("weights") or {}
        acts = group.get("input_activations")
        group_fmt = group.get("format") or fmt
        targets = group.get("targets") or []
        if group_fmt not in ("float-quantized", "naive-quantized") or (
                weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8):
            raise ValueError(
                f"The checkpoint's quantization_config (compressed-tensors, group {name!r}) is "
                f"format {group_fmt!r} with {weights.get('num_bits')}-bit {weights.get('type')} "
                "weights; pagedllm supports compressed-tensors 'float-quantized' (FP8) only.")
        if not any(t == "Linear" or str(t).endswith("Linear") for t in targets):
            raise ValueError(f"compressed-tensors group {name!r} targets {targets}; only "
                             "groups of Linear layers are supported.")
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("channel", "tensor"):
            raise ValueError(f"compressed-tensors FP8 weight strategy {strategy!r} (group "
                             f"{name!r}) is not supported; supported: channel, tensor.")
        if acts is None:
            activation = "dynamic"
        else:
            if acts.get("type") != "float" or int(acts.get("num_bits", 0)) != 8:
                raise ValueError(f"compressed-tensors input activations of group {name!r} "
                                 "must be 8-bit float.")
            activation = "dynamic" if acts.get("dynamic") else "static"
            if activation == "static" and acts.get("strategy", "tensor") != "tensor":
                raise ValueError("compressed-tensors static input activations must be per "
                                 f"tensor (group {name!r} has {acts.get('strategy')!r}).")
        schemes.append((strategy, activation))
    if len(set(schemes)) != 1:
        raise ValueError(f"compressed-tensors config groups differ {sorted(set(schemes))}; "
                         "one FP8 scheme for all Linear layers is supported.")
    strategy, activation = schemes[0]
    return QuantSpec("compressed-tensors", "fp8", weight_scale=strategy, activation=activation,
                     ignore=tuple(qc.get("ignore") or ()))


def _parse_int4(method: str, qc: dict[str, Any]) -> QuantSpec:
    bits = int(qc.get("bits", qc.get("w_bit", 0)))
    if bits != 4:
        raise ValueError(f"The checkpoint's quantization_config ({method}) has bits={bits}; "
                         "pagedllm supports 4-bit AWQ / GPTQ checkpoints.")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if group != -1 and (group <= 0 or group % 8):
        raise ValueError(f"{method} group_size={group} is not supported (a multiple of 8, "
                         "or -1).")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; supported: gemm.")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not "
                             "supported.")
        return QuantSpec("awq", "int4", group_size=group,
                         ignore=tuple(qc.get("modules_to_not_convert") or ()))
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq, "
                         "gptq_v2.")
    return QuantSpec("gptq", "int4", group_size=group, desc_act=bool(qc.get("desc_act")),
                     zero_offset=1 if fmt == "gptq" else 0,
                     ignore=tuple(qc.get("modules_to_not_convert") or ()))


def resolve_quantization(requested: str | None, hf_config: Any, device: str,
                         tensor_parallel_size: int) -> QuantSpec | None:
    """The engine's QuantSpec from `quantization=` (not gguf; None: the checkpoint's, if any)
    and the checkpoint's quantization_config. Raises ValueError naming the options."""
    qc = checkpoint_quantization_config(hf_config)
    ckpt = parse_checkpoint_quantization(qc) if qc is not None else None
    if requested is not None and requested not in CHECKPOINT_METHODS:
        raise ValueError(f"quantization={requested!r} is not supported; supported: "
                         f"{', '.join(QUANTIZATION_METHODS)} (or leave it unset).")
    if ckpt is None:
        if requested is None:
            return None
        if requested != "fp8":
            raise ValueError(f"quantization={requested!r} needs a checkpoint quantized with "
                             f"{requested} (config.json has no quantization_config); "
                             "quantization='fp8' quantizes a bf16 / fp16 checkpoint at load.")
        spec = QuantSpec("fp8", "fp8", from_checkpoint=False, activation="dynamic")
        _check_fp8_device(device, "quantization='fp8'")
        return spec
    if requested is not None and requested != ckpt.method:
        raise ValueError(f"quantization={requested!r} does not match the checkpoint, which is "
                         f"quantized with {ckpt.method!r}; leave quantization unset.")
    if device == "cpu":
        spec = _with(ckpt, dequantize=True)
    elif ckpt.weight == "fp8" and not cuda_supports_fp8():
        spec = _with(ckpt, dequantize=True)
        logger.warning("This GPU (compute capability %s) has no FP8 support: the %s "
                       "checkpoint's weights are dequantized at load.",
                       _capability_text(), ckpt.method)
    else:
        spec = ckpt
    if not spec.dequantize and spec.weight == "int4" and tensor_parallel_size != 1:
        raise ValueError(f"{spec.method} checkpoints run with tensor_parallel_size=1 on the GPU "
                         f"(got {tensor_parallel_size}).")
    return spec


def _with(spec: QuantSpec, **changes: Any) -> QuantSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def cuda_supports_fp8() -> bool:
    """Whether the current CUDA device computes in FP8 (compute capability >= 8.9)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY


def _capability_text() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _check_fp8_device(device: str, what: str) -> None:
    if device == "cpu":
        if not cpu_scaled_mm_works():
            raise ValueError(f"{what} needs torch's FP8 matmul, which this torch "
                             f"({torch.__version__}) lacks on the CPU; run it on a GPU with "
                             "compute capability >= 8.9 (Ada, Hopper) or leave it unset.")
        logger.warning("%s on the CPU runs torch's FP8 CPU matmul: correct, but slower than "
                       "the dense model.", what)
        return
    if not cuda_supports_fp8():
        raise ValueError(f"{what} needs a GPU with FP8 support (compute capability >= 8.9: "
                         f"Ada, Hopper or newer); this one is {_capability_text()}. Leave "
                         "quantization unset, or use an AWQ / GPTQ checkpoint.")


def cpu_scaled_mm_works() -> bool:
    """Whether torch._scaled_mm runs FP8 on the CPU with per-row scales (torch >= 2.8 or so)."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        return False
    return True
