"""Gemma 2 and Gemma 3 (text): greedy parity with HF transformers on tiny random models,
also under preemption, chunked prefill and prefix hits; per-layer windows and rope; bad
settings refused at load."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TINY
from parity_utils import check_all_modes, reference_case

from pagedllm import LLM

SHARED_PREFIX = 96
GEMMA_MODELS: dict[str, tuple[str, dict]] = {
    # Softcapped attention scores and logits, alternating sliding (32) / global layers.
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=32,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              tie_word_embeddings=True, num_hidden_layers=3,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"])),
    # Local rope base for the sliding layers, linear-scaled global rope for the full one.
    "gemma3": ("gemma3_text", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=32, tie_word_embeddings=True,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}})),
}


@pytest.fixture(scope="module")
def gemma_case(tmp_path_factory):
    from model_utils import make_tiny_model

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model_type, overrides = GEMMA_MODELS[name]
            folder = make_tiny_model(tmp_path_factory.mktemp(name), model_type,
                                     **{**TINY, **overrides})
            cache[name] = reference_case(folder, len(name), SHARED_PREFIX)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(GEMMA_MODELS))
def test_gemma_greedy_parity_all_modes(name, gemma_case):
    folder, prompts, expected, prefix_prompts, prefix_expected = gemma_case(name)
    check_all_modes(folder, prompts, expected, prefix_prompts, prefix_expected,
                    SHARED_PREFIX)


def test_gemma3_kv_cache_specs_follow_layer_types(gemma_case):
    llm = LLM(gemma_case("gemma3")[0], device="cpu", dtype="float32")
    model = llm.engine.executor.runner.model
    specs = model.kv_cache_specs()
    assert [s.sliding_window for s in specs] == [32, 32, None]
    assert {(s.num_kv_heads, s.head_dim) for s in specs} == {(2, 16)}
    bases = [layer.self_attn.rotary_emb for layer in model.layers]
    # The sliding layers share the local base; the global layer differs (base and scaling).
    assert (bases[0].cos_cache == bases[1].cos_cache).all()
    assert not (bases[0].cos_cache[1:] == bases[2].cos_cache[1:]).all()


def _edit_config(folder: str, dest: str, **changes) -> str:
    import shutil

    shutil.copytree(folder, dest)
    path = os.path.join(dest, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))
    return dest


@pytest.mark.parametrize("changes,match", [
    (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping"),
    (dict(final_logit_softcapping=0.0), "final_logit_softcapping"),
    (dict(hidden_activation="relu"), "hidden_activation"),
])
def test_gemma2_bad_settings_are_named(gemma_case, tmp_path, changes, match):
    bad = _edit_config(gemma_case("gemma2")[0], str(tmp_path / "bad"), **changes)
    with pytest.raises(ValueError, match=match):
        LLM(bad, device="cpu", dtype="float32")


def test_gemma3_unsupported_rope_is_named(gemma_case, tmp_path):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "mrope", "rope_theta": 1e6}}
    bad = _edit_config(gemma_case("gemma3")[0], str(tmp_path / "bad"), rope_parameters=rope)
    with pytest.raises(ValueError, match="mrope"):
        LLM(bad, device="cpu", dtype="float32")


def test_softcap_refused_by_triton_backend():
    from pagedllm.attention.backends.triton_attn import TritonAttentionImpl

    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        TritonAttentionImpl(4, 16, 0.25, 2, None, logits_soft_cap=50.0)
