"""Sliding windows per layer from config.layer_types for the Llama-style families (Qwen2
with use_sliding_window: HF applies the window only to the layers layer_types marks)."""

from __future__ import annotations

import pytest
from conftest import TINY
from model_utils import make_tiny_model
from parity_utils import generate, hf_greedy, hf_model, make_prompts

from pagedllm import LLM


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_moe"])
def test_layer_types_choose_sliding_layers(tmp_path, model_type):
    extra = dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
                 shared_expert_intermediate_size=64) if model_type == "qwen2_moe" else {}
    folder = make_tiny_model(tmp_path, model_type, **{
        **TINY, **extra, "num_hidden_layers": 3, "use_sliding_window": True,
        "sliding_window": 32, "max_window_layers": 1})
    model = hf_model(folder)
    layer_types = model.config.layer_types
    assert "sliding_attention" in layer_types and "full_attention" in layer_types
    prompts = make_prompts(model.config.vocab_size, seed=11)[3:]  # 31..200 tokens > window
    llm = LLM(folder, device="cpu", dtype="float32")
    windows = [s.sliding_window for s in llm.engine.executor.runner.model.kv_cache_specs()]
    assert windows == [32 if t == "sliding_attention" else None for t in layer_types]
    assert generate(llm, prompts) == hf_greedy(model, prompts)
