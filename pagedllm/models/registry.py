"""The one model registry: HF architecture names, HF `model_type` values, GGUF
`general.architecture` names, the model class and what it does (generate or pool)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelEntry:
    """One HF architecture name and how pagedllm serves it."""

    architecture: str  # HF `architectures[0]`
    module: str
    cls: str
    runner: str  # "generate" or "pooling": what the architecture does by itself
    model_types: tuple[str, ...] = ()  # HF model_type values that imply it (no architectures)
    gguf_names: tuple[str, ...] = ()  # GGUF general.architecture values that load as it
    paged_kv: bool = True  # a decoder over the paged KV cache (False: an encoder)
    # Decoder bodies without an LM head ("LlamaModel") pool through this generating entry.
    pooling_of: str | None = None


def _decoder(arch: str, module: str, model_types: tuple[str, ...] = (),
             gguf_names: tuple[str, ...] = (), cls: str | None = None) -> ModelEntry:
    return ModelEntry(arch, f"pagedllm.models.{module}", cls or arch, "generate", model_types,
                      gguf_names)


def _encoder(arch: str, model_types: tuple[str, ...] = ()) -> ModelEntry:
    return ModelEntry(arch, "pagedllm.models.bert", "BertModel", "pooling", model_types,
                      paged_kv=False)


def _body(arch: str, of: str) -> ModelEntry:
    return ModelEntry(arch, "", "", "pooling", pooling_of=of)


_ENTRIES: tuple[ModelEntry, ...] = (
    _decoder("LlamaForCausalLM", "llama", ("llama",), ("llama",)),
    _decoder("MistralForCausalLM", "llama", ("mistral",), ("mistral",)),
    _decoder("Qwen2ForCausalLM", "qwen2", ("qwen2",), ("qwen2",)),
    _decoder("Qwen3ForCausalLM", "qwen3", ("qwen3",), ("qwen3",)),
    _decoder("MixtralForCausalLM", "mixtral", ("mixtral",)),
    _decoder("Qwen2MoeForCausalLM", "qwen2_moe", ("qwen2_moe",), ("qwen2moe",)),
    _decoder("Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3_moe",), ("qwen3moe",)),
    _decoder("Gemma2ForCausalLM", "gemma", ("gemma2",), ("gemma2",)),
    _decoder("Gemma3ForCausalLM", "gemma", ("gemma3_text",), ("gemma3",)),
    _decoder("Phi3ForCausalLM", "phi3", ("phi3",), ("phi3",)),
    _encoder("BertModel", ("bert",)),
    _encoder("BertForMaskedLM"),
    _encoder("RobertaModel"),
    _encoder("RobertaForMaskedLM"),
    _encoder("XLMRobertaModel"),
    _encoder("XLMRobertaForMaskedLM"),
    _body("LlamaModel", "LlamaForCausalLM"),
    _body("Qwen2Model", "Qwen2ForCausalLM"),
    _body("Qwen3Model", "Qwen3ForCausalLM"),
    _body("MistralModel", "MistralForCausalLM"),
)
_BY_ARCH: dict[str, ModelEntry] = {e.architecture: e for e in _ENTRIES}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def gguf_architectures() -> dict[str, str]:
    """GGUF `general.architecture` -> HF architecture name, for the GGUF loader."""
    return {g: e.architecture for e in _ENTRIES for g in e.gguf_names}


def get_entry(architecture: str) -> ModelEntry:
    """The registry entry of an HF architecture name (ValueError listing the supported)."""
    entry = _BY_ARCH.get(architecture)
    if entry is None:
        raise ValueError(f"Model architecture {architecture!r} is not supported. Supported "
                         f"architectures: {', '.join(supported_architectures())}.")
    return entry


def resolve_architecture(hf_config: Any, runner: str) -> tuple[str, str]:
    """Pick (runner, architecture) for a config; ValueError listing what is supported."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", None) or ""
        archs = [e.architecture for e in _ENTRIES if model_type in e.model_types][:1]
    for arch in archs:
        entry = _BY_ARCH.get(arch)
        if entry is None:
            continue
        if entry.pooling_of is not None:
            if runner == "generate":
                raise ValueError(
                    f"{arch} has no language-model head and cannot generate text; use "
                    "runner='pooling' and LLM.embed()/encode()."
                )
            return "pooling", entry.pooling_of
        if runner == "auto":
            return entry.runner, arch
        if runner == "generate" and entry.runner == "pooling":
            raise ValueError(
                f"{arch} is an encoder (embedding) model and cannot generate text; "
                "use runner='pooling' and LLM.embed()/encode()."
            )
        return runner, arch  # "pooling" of a generating decoder: used as an embedder
    raise ValueError(
        f"Model architectures {archs or '(none given)'} are not supported. Supported "
        f"architectures: {', '.join(supported_architectures())}."
    )


def get_model_class(architecture: str) -> type:
    entry = get_entry(architecture)
    if entry.pooling_of is not None:
        entry = get_entry(entry.pooling_of)
    return getattr(importlib.import_module(entry.module), entry.cls)
