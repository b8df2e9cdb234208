"""Phi-3: fused qkv_proj / gate_up_proj checkpoints, longrope with a partial rotary
dimension and a sliding window; greedy parity with HF in all modes."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import TINY
from parity_utils import check_all_modes, reference_case

from pagedllm import LLM

SHARED_PREFIX = 16  # prompts stay within original_max_position_embeddings
ROTARY_DIM = 8  # head_dim 16 x partial_rotary_factor 0.5
PHI3 = dict(
    sliding_window=48, original_max_position_embeddings=256,
    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                     "partial_rotary_factor": 0.5, "original_max_position_embeddings": 256,
                     "short_factor": [1.0, 1.3, 1.9, 2.4],
                     "long_factor": [1.1, 2.0, 4.0, 7.5]},
)


@pytest.fixture(scope="module")
def phi3_case(tmp_path_factory):
    from model_utils import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("phi3"), "phi3", **{**TINY, **PHI3})
    return reference_case(folder, 4, SHARED_PREFIX)


def test_phi3_greedy_parity_all_modes(phi3_case):
    folder, prompts, expected, prefix_prompts, prefix_expected = phi3_case
    # Contexts up to original_max_position_embeddings: HF's short factors, as here.
    check_all_modes(folder, prompts, expected, prefix_prompts, prefix_expected,
                    SHARED_PREFIX, max_model_len=256)


def test_phi3_long_context_uses_long_factors(phi3_case):
    folder = phi3_case[0]
    short = LLM(folder, device="cpu", dtype="float32", max_model_len=256)
    long = LLM(folder, device="cpu", dtype="float32", max_model_len=512)
    rope_s = short.engine.executor.runner.model.layers[0].self_attn.rotary_emb
    rope_l = long.engine.executor.runner.model.layers[0].self_attn.rotary_emb
    assert rope_s.rotary_dim == rope_l.rotary_dim == ROTARY_DIM
    assert not (rope_s.cos_cache[1:256] == rope_l.cos_cache[1:256]).all()


def test_phi3_bad_fused_tensor_is_named(phi3_case, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = str(tmp_path / "bad")
    shutil.copytree(phi3_case[0], bad)
    path = os.path.join(bad, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-16].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LLM(bad, device="cpu", dtype="float32")


@pytest.mark.parametrize("params,match", [
    ({"short_factor": [1.0] * 4}, "long_factor"),
    ({"short_factor": [1.0] * 3, "long_factor": [1.0] * 3}, "rotary dimension 8"),
])
def test_longrope_bad_factors_are_named(params, match):
    """Our own checks (transformers validates its configs too, but a config may come from
    GGUF metadata or an older transformers)."""
    from types import SimpleNamespace

    from pagedllm.models.layers.rotary import RotaryEmbedding

    config = SimpleNamespace(max_position_embeddings=512, original_max_position_embeddings=256)
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(16, 512, config, rotary_dim=ROTARY_DIM,
                        params={"rope_type": "longrope", "rope_theta": 1e4, **params})
