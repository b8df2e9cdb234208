"""HF `architectures` name -> our model class, and the runner (generate / pooling) it implies."""

from __future__ import annotations

import importlib
from typing import Any

# architecture -> (module, class, runner)
_MODELS: dict[str, tuple[str, str, str]] = {
    "LlamaForCausalLM": ("pagedllm.models.llama", "LlamaForCausalLM", "generate"),
    "MistralForCausalLM": ("pagedllm.models.llama", "MistralForCausalLM", "generate"),
    "Qwen2ForCausalLM": ("pagedllm.models.qwen2", "Qwen2ForCausalLM", "generate"),
    "Qwen3ForCausalLM": ("pagedllm.models.qwen3", "Qwen3ForCausalLM", "generate"),
    "BertModel": ("pagedllm.models.bert", "BertModel", "pooling"),
    "BertForMaskedLM": ("pagedllm.models.bert", "BertModel", "pooling"),
    "RobertaModel": ("pagedllm.models.bert", "BertModel", "pooling"),
    "RobertaForMaskedLM": ("pagedllm.models.bert", "BertModel", "pooling"),
    "XLMRobertaModel": ("pagedllm.models.bert", "BertModel", "pooling"),
    "XLMRobertaForMaskedLM": ("pagedllm.models.bert", "BertModel", "pooling"),
}
# Decoder models that may also serve as embedders (last-token / mean pooling).
_POOLING_DECODERS = {
    "LlamaModel": "LlamaForCausalLM",
    "Qwen2Model": "Qwen2ForCausalLM",
    "Qwen3Model": "Qwen3ForCausalLM",
    "MistralModel": "MistralForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(set(_MODELS) | set(_POOLING_DECODERS))


def resolve_architecture(hf_config: Any, runner: str) -> tuple[str, str]:
    """Pick (runner, architecture) for a config; ValueError listing what is supported."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", None)
        guess = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "bert": "BertModel"}.get(model_type or "")
        archs = [guess] if guess else []
    for arch in archs:
        if arch in _MODELS:
            natural = _MODELS[arch][2]
            if runner == "auto":
                return natural, arch
            if runner == "pooling" and natural == "generate":
                return "pooling", arch  # a decoder used as an embedder
            if runner == "generate" and natural == "pooling":
                raise ValueError(
                    f"{arch} is an encoder (embedding) model and cannot generate text; "
                    "use runner='pooling' and LLM.embed()/encode()."
                )
            return runner, arch
        if arch in _POOLING_DECODERS:
            if runner == "generate":
                raise ValueError(
                    f"{arch} has no language-model head and cannot generate text; use "
                    "runner='pooling' and LLM.embed()/encode()."
                )
            return "pooling", _POOLING_DECODERS[arch]
    raise ValueError(
        f"Model architectures {archs or '(none given)'} are not supported. Supported "
        f"architectures: {', '.join(supported_architectures())}."
    )


def get_model_class(architecture: str) -> type:
    module_name, class_name, _ = _MODELS[architecture]
    return getattr(importlib.import_module(module_name), class_name)
