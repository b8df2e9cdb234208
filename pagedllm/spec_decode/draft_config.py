"""The draft model of speculative method "draft_model": resolved and checked at start-up."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pagedllm.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from pagedllm.config import ModelConfig


def resolve_draft_model(spec: SpeculativeConfig, target: ModelConfig, device: str,
                        tensor_parallel_size: int) -> ModelConfig | None:
    """The draft's ModelConfig (None for "ngram"); ValueError when the draft cannot serve as
    this target's proposer: another vocabulary, another device type, a shorter context,
    tensor parallelism, or a model that does not generate."""
    if target.runner != "generate":
        raise ValueError("speculative_config applies to text generation; this model runs "
                         f"as runner={target.runner!r}. Drop speculative_config.")
    if spec.method != "draft_model":
        return None
    if spec.device is not None and spec.device.split(":")[0].lower() != device:
        raise ValueError(
            f"speculative_config device {spec.device!r} differs from the target's device "
            f"{device!r}: the draft model runs on the target's device, with KV blocks of the "
            "target's block manager. Drop 'device' or set it to the target's.")
    if tensor_parallel_size != 1:
        raise ValueError("speculative_config with a draft model needs tensor_parallel_size=1 "
                         "(the draft is not sharded); use method 'ngram' with tensor "
                         "parallelism.")
    from pagedllm.models.loader.resolve import resolve_model
    from pagedllm.models.registry import resolve_architecture

    # A target with dummy weights (benchmarks) gets a dummy draft: the same seed gives the
    # same weights, so a draft of the target's shape is the target itself.
    resolved = resolve_model(spec.model, trust_remote_code=target.trust_remote_code,
                             load_format="dummy" if target.load_format == "dummy" else "auto")
    hf_config = resolved.hf_config
    runner, architecture = resolve_architecture(hf_config, "generate")
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab != target.vocab_size:
        raise ValueError(
            f"The draft model {spec.model!r} has a vocabulary of {vocab} tokens, the target "
            f"{target.model!r} one of {target.vocab_size}: a draft must share the target's "
            "tokenizer and vocabulary.")
    from pagedllm.config import _derived_max_model_len

    draft_len = _derived_max_model_len(hf_config)
    if draft_len < target.max_model_len:
        raise ValueError(
            f"The draft model {spec.model!r} takes {draft_len} positions, fewer than "
            f"max_model_len={target.max_model_len}; lower max_model_len to {draft_len}.")
    quantization = ("gguf" if resolved.load_format == "gguf" and target.quantization == "gguf"
                    else None)
    sliding_window = getattr(hf_config, "sliding_window", None)
    if not getattr(hf_config, "use_sliding_window", True):
        sliding_window = None
    return dataclasses.replace(
        target, model=spec.model, model_path=resolved.path,
        tokenizer=resolved.tokenizer_path, hf_config=hf_config, architecture=architecture,
        load_format=resolved.load_format, runner=runner, quantization=quantization,
        sliding_window=sliding_window if isinstance(sliding_window, int) else None)
