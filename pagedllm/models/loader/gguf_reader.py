"""GGUF files: the binary header reader and lazy tensor access.

A GGUF file (llama.cpp's format) holds a key/value metadata header, a table of tensor
descriptors and the (possibly quantized) tensor data. The header is parsed here with a
small struct-based reader (``gguf.GGUFReader`` builds one numpy view per array element,
which costs seconds on a 49k-token vocabulary). Tensors stay in a read-only memory map
until asked for, raw (``raw_blocks``) or dequantized (``dequantize``).

Differences from the HF layout that are undone here:

* GGUF stores dimensions innermost-first (``ne[0]`` is the row length), so the HF shape is
  the reversed GGUF shape.
* llama.cpp's converter permutes the rows of the Q and K projections of ``llama``-architecture
  models (it turns HF's "rotate half" rope layout into interleaved pairs). The permutation is
  inverted exactly as transformers' GGUF loader does (``LlamaTensorProcessor``), for weights
  and biases. Qwen2/Qwen3 use the NeoX rope layout and are stored unpermuted.
* MoE files (``qwen2moe`` / ``qwen3moe``) stack each layer's experts in one tensor
  (``ffn_gate_exps`` / ``ffn_up_exps`` [E, I, H], ``ffn_down_exps`` [E, H, I]); ``hf_name``
  gives such a tensor a name with an ``{expert}`` field and the weight iterator yields one
  HF per-expert tensor (``mlp.experts.{e}.gate_proj.weight``) per slice.
* llama.cpp's Gemma 2/3 converter stores every RMSNorm weight with the 1 of Gemma's
  ``(1 + w)`` already added; ``dequantize`` subtracts it again (as transformers does).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pagedllm.models.loader.gguf_dequant import dequantize_rows

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

SUPPORTED_QUANT_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)

# GGUF `general.architecture` -> architecture family used for config and weight layout.
ARCHITECTURE_ALIASES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2moe",
    "qwen3moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
}
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")

# Per-layer GGUF tensor stems -> HF module paths (relative to `model.layers.{i}.`).
_LAYER_TENSOR_MAP: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Family-specific stems (they override the common ones above).
_MOE_TENSOR_MAP: dict[str, str] = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{expert}.gate_proj",
    "ffn_up_exps": "mlp.experts.{expert}.up_proj",
    "ffn_down_exps": "mlp.experts.{expert}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GEMMA_TENSOR_MAP: dict[str, str] = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_TENSOR_MAP: dict[str, str] = {  # fused as in HF's Phi-3 checkpoints
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}
_GLOBAL_TENSOR_MAP: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors with no HF counterpart (llama3 rope frequency factors are expressed through the
# config's rope parameters in HF; transformers skips them too).
_IGNORED_TENSORS = {"rope_freqs.weight"}
_LAYER_NAME_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")

_CORRUPT_HINT = "the file looks truncated or corrupt: re-download it"

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALAR_NUMPY: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class _Truncated(Exception):
    """Internal: a read ran past the end of the file or hit an impossible value."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor descriptor: GGUF name, HF-order shape, type and absolute byte range."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reader over a buffer."""

    def __init__(self, buf: memoryview, offset: int = 0) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = offset

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(f"read of {n} bytes at offset {self.pos} past end ({self.size})")

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self._need(n)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self._need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        try:
            gtype = GGUFValueType(vtype)
        except ValueError as exc:
            raise _Truncated(f"unknown metadata value type {vtype}") from exc
        if gtype == GGUFValueType.STRING:
            return self.string()
        if gtype == GGUFValueType.ARRAY:
            item_type = self.scalar("I")
            count = self.scalar("Q")
            if count > self.size:  # every element takes at least one byte
                raise _Truncated(f"array of {count} elements cannot fit in the file")
            try:
                item_gtype = GGUFValueType(item_type)
            except ValueError as exc:
                raise _Truncated(f"unknown array element type {item_type}") from exc
            if item_gtype in _SCALAR_NUMPY:
                dtype = np.dtype(_SCALAR_NUMPY[item_gtype])
                self._need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if item_gtype == GGUFValueType.STRING:
                return self._string_array(count)
            return [self.value(item_type) for _ in range(count)]
        return self.scalar(_SCALAR_FORMATS[gtype])

    def _string_array(self, count: int) -> list[str]:
        out: list[str] = []
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated("string array runs past the end of the file")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise _Truncated("string array runs past the end of the file")
            out.append(bytes(buf[pos : pos + n]).decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def _supported_types_text() -> str:
    return ", ".join(t.name for t in SUPPORTED_QUANT_TYPES)


class GGUFCheckpoint:
    """A parsed GGUF file: metadata, tensor table and lazy access to tensor data.

    Raises ``ValueError`` with an actionable message for a missing path, a truncated or
    corrupt file, an unsupported architecture or an unsupported tensor type.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"GGUF file {str(self.path)!r} does not exist")
        if not self.path.is_file():
            raise ValueError(f"GGUF path {str(self.path)!r} is not a file")
        size = self.path.stat().st_size
        if size < 24:
            raise ValueError(f"GGUF file {str(self.path)!r} is only {size} bytes: {_CORRUPT_HINT}")
        self.file_size = size
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self.metadata, self.tensors, self.data_offset = self._parse()
        except _Truncated as exc:
            raise ValueError(
                f"Could not read GGUF file {str(self.path)!r} ({exc}): {_CORRUPT_HINT}"
            ) from exc
        self.tensor_by_name = {t.name: t for t in self.tensors}
        self.raw_architecture = self._require_architecture()
        self.architecture = ARCHITECTURE_ALIASES[self.raw_architecture]
        self.layer_tensor_map = layer_tensor_map(self.architecture)
        self._check_tensors()

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self) -> tuple[dict[str, Any], list[GGUFTensorInfo], int]:
        buf = memoryview(self._data)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ValueError(
                f"{str(self.path)!r} is not a GGUF file (magic {bytes(buf[:4])!r}, expected "
                f"{GGUF_MAGIC!r}): {_CORRUPT_HINT}"
            )
        cur = _Cursor(buf, 4)
        version = cur.scalar("I")
        if version & 0xFFFF == 0 and version != 0:
            raise ValueError(f"{str(self.path)!r} is a big-endian GGUF file: not supported")
        if version not in SUPPORTED_GGUF_VERSIONS:
            raise ValueError(
                f"{str(self.path)!r} has GGUF version {version}; supported versions: "
                f"{SUPPORTED_GGUF_VERSIONS} ({_CORRUPT_HINT} if it should be a recent file)"
            )
        tensor_count = cur.scalar("Q")
        kv_count = cur.scalar("Q")
        if tensor_count > self.file_size or kv_count > self.file_size:
            raise _Truncated(f"implausible counts ({tensor_count} tensors, {kv_count} keys)")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"))

        raw_infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(tensor_count):
            name = cur.string()
            n_dims = cur.scalar("I")
            if not 1 <= n_dims <= 4:
                raise _Truncated(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(cur.scalar("Q") for _ in range(n_dims))
            raw_type = cur.scalar("I")
            rel_offset = cur.scalar("Q")
            raw_infos.append((name, dims, raw_type, rel_offset))

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Truncated(f"invalid general.alignment {alignment!r}")
        data_offset = -(-cur.pos // alignment) * alignment

        tensors: list[GGUFTensorInfo] = []
        for name, dims, raw_type, rel_offset in raw_infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(
                    f"Tensor {name!r} in {str(self.path)!r} has unknown GGML type id "
                    f"{raw_type} (the file is corrupt or newer than this loader). "
                    f"Supported types: {_supported_types_text()}"
                ) from None
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block_size:
                raise _Truncated(
                    f"tensor {name!r} row length {dims[0]} is not a multiple of the "
                    f"{qtype.name} block size {block_size}"
                )
            n_elems = int(np.prod(dims, dtype=np.int64))
            nbytes = n_elems // block_size * type_size
            tensors.append(
                GGUFTensorInfo(
                    name=name,
                    shape=tuple(int(d) for d in reversed(dims)),
                    qtype=qtype,
                    offset=data_offset + rel_offset,
                    nbytes=nbytes,
                )
            )
        return metadata, tensors, data_offset

    def _require_architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError(
                f"GGUF file {str(self.path)!r} has no general.architecture metadata: "
                "it is not a model checkpoint"
            )
        if arch not in ARCHITECTURE_ALIASES:
            raise ValueError(
                f"GGUF architecture {arch!r} in {str(self.path)!r} is not supported; "
                f"supported architectures: {', '.join(ARCHITECTURE_ALIASES)}"
            )
        return arch

    def _check_tensors(self) -> None:
        for t in self.tensors:
            if t.qtype not in SUPPORTED_QUANT_TYPES:
                raise ValueError(
                    f"Tensor {t.name!r} in {str(self.path)!r} uses quantization type "
                    f"{t.qtype.name}, which is not supported. Supported types: "
                    f"{_supported_types_text()}"
                )
            if t.offset + t.nbytes > self.file_size:
                raise ValueError(
                    f"Tensor {t.name!r} ends at byte {t.offset + t.nbytes} but "
                    f"{str(self.path)!r} has only {self.file_size} bytes: {_CORRUPT_HINT}"
                )

    # -- metadata helpers --------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value for ``key`` (e.g. ``"tokenizer.chat_template"``) or ``default``."""
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """Architecture-scoped metadata, e.g. ``arch_get("block_count")``."""
        return self.metadata.get(f"{self.raw_architecture}.{suffix}", default)

    @property
    def has_output_weight(self) -> bool:
        """Whether the file has a separate ``output.weight`` (an untied lm_head)."""
        return "output.weight" in self.tensor_by_name

    # -- tensors -------------------------------------------------------------------------------

    def hf_name(self, gguf_name: str) -> str | None:
        """HF parameter name for a GGUF tensor name, or None when it has none."""
        if gguf_name in _IGNORED_TENSORS:
            return None
        m = _LAYER_NAME_RE.match(gguf_name)
        if m is not None:
            layer, stem, kind = m.groups()
            target = self.layer_tensor_map.get(stem)
            return None if target is None else f"model.layers.{layer}.{target}.{kind}"
        stem, _, kind = gguf_name.rpartition(".")
        target = _GLOBAL_TENSOR_MAP.get(stem)
        return None if target is None else f"{target}.{kind}"

    def raw_rows(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's stored bytes as uint8 rows [rows, row bytes] in HF row order (the
        llama Q/K row permutation undone: quantization blocks never cross a row)."""
        raw = self._data[info.offset : info.offset + info.nbytes].view(np.ndarray)
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        if len(info.shape) == 1 and block_size == 1:  # a bias or norm: one row per element
            rows = raw.reshape(info.shape[0], type_size)
        else:
            rows = raw.reshape(-1, info.shape[-1] // block_size * type_size)
        n_head = self._permuted_heads(info.name)
        return rows if n_head is None else _unpermute_rows(rows, n_head)

    def _permuted_heads(self, gguf_name: str) -> int | None:
        """Heads of a Q/K projection whose rows llama.cpp permuted, else None."""
        if self.architecture != "llama":
            return None
        if ".attn_q." in gguf_name:
            return int(self.arch_get("attention.head_count"))
        if ".attn_k." in gguf_name:
            n_kv = self.arch_get("attention.head_count_kv")
            return int(n_kv if n_kv is not None else self.arch_get("attention.head_count"))
        return None

    def dequantize(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor as a float32 numpy array in HF shape (llama Q/K permutation undone,
        Gemma's +1 on norm weights undone; expert stacks keep their leading expert axis)."""
        array = dequantize_rows(self.raw_rows(info), info.qtype).reshape(info.shape)
        if self.architecture in GEMMA_ARCHITECTURES and info.name.endswith("norm.weight"):
            array = array - np.float32(1.0)
        if info.name.endswith(".ffn_gate_inp_shexp.weight"):
            array = array.reshape(1, -1)  # HF's shared_expert_gate is a [1, H] linear
        return array


def layer_tensor_map(architecture: str) -> dict[str, str]:
    """Per-layer GGUF tensor stems -> HF module paths for one architecture family."""
    table = dict(_LAYER_TENSOR_MAP)
    if architecture in MOE_ARCHITECTURES:
        table.update(_MOE_TENSOR_MAP)
    if architecture in GEMMA_ARCHITECTURES:
        table.update(_GEMMA_TENSOR_MAP)
    if architecture == "phi3":
        table.update(_PHI3_TENSOR_MAP)
    return table


def _unpermute_rows(arr: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved rope pairs -> HF rotate-half).

    llama.cpp viewed HF rows as (heads, 2, head_dim/2) and swapped the last two axes; view
    the stored rows as (heads, head_dim/2, 2) and swap back. Same as transformers.
    """
    half = arr.shape[0] // n_head // 2
    return arr.reshape(n_head, half, 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)




def open_checkpoint(path: str | os.PathLike[str] | GGUFCheckpoint) -> GGUFCheckpoint:
    """A parsed checkpoint (``path`` itself when it is one already)."""
    return path if isinstance(path, GGUFCheckpoint) else GGUFCheckpoint(path)
