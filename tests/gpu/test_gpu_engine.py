"""End-to-end on CUDA: greedy parity with HF transformers in fp32 and bf16, with and without
CUDA graphs, through the Triton backend (and the torch backend on CUDA)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).parent.parent))

NEW_TOKENS = 24
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from model_utils import make_tiny_model

    return {
        "llama": make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", **TINY),
        "qwen2": make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", **TINY),
        # bf16 greedy runs of a 0.1-init model are chaotic: HF's own bf16 and fp32 agree on
        # the first 16 tokens for only 4 of 12 prompts (benchmarks/bf16_probe.py). A wider
        # init separates the logits so the comparison tests our kernels, not rounding luck.
        "llama_bf16": make_tiny_model(tmp_path_factory.mktemp("llama_bf16"), "llama",
                                      **{**TINY, "initializer_range": 0.3}),
    }


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    lens = [3, 9, 17, 40, 77, 128, 200, 333, 5, 64, 150, 500]
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lens]


def _hf(folder: str, prompts, dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).cuda()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
            outs.append(gen[0, len(p):].tolist())
    return outs


def _ours(folder: str, prompts, replays: dict | None = None, **kwargs) -> list[list[int]]:
    """Greedy tokens; `replays` gets the number of mixed-step graph replays."""
    from pagedllm import LLM, SamplingParams

    llm = LLM(folder, device="cuda", gpu_memory_utilization=0.3, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    kv = llm.engine.scheduler.kv
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    if replays is not None:
        graphs = llm.engine.executor.runner.graphs
        replays["mixed"] = graphs.mixed_replays if graphs is not None else 0
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_fp32_parity(folders, arch, enforce_eager):
    from transformers import AutoConfig

    folder = folders[arch]
    prompts = _prompts(AutoConfig.from_pretrained(folder).vocab_size)
    expected = _hf(folder, prompts, torch.float32)
    got = _ours(folder, prompts, dtype="float32", enforce_eager=enforce_eager)
    assert got == expected


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_bf16_parity(folders, enforce_eager):
    from transformers import AutoConfig

    folder = folders["llama_bf16"]
    prompts = _prompts(AutoConfig.from_pretrained(folder).vocab_size)
    expected = _hf(folder, prompts, torch.bfloat16)
    got = _ours(folder, prompts, dtype="bfloat16", enforce_eager=enforce_eager)
    matches = sum(g[:16] == e[:16] for g, e in zip(got, expected))
    assert matches >= 0.9 * len(prompts), (matches, len(prompts))


def test_graphs_match_eager_under_preemption_and_chunking(folders):
    from transformers import AutoConfig

    folder = folders["llama"]
    prompts = _prompts(AutoConfig.from_pretrained(folder).vocab_size)
    eager = _ours(folder, prompts, dtype="float32", enforce_eager=True)
    replays: dict = {}
    graphs = _ours(folder, prompts, replays, dtype="float32", num_gpu_blocks_override=80,
                   max_model_len=600, max_num_batched_tokens=128, max_num_seqs=8)
    assert graphs == eager
    assert replays["mixed"] > 0  # chunked prefills beside decodes ran from mixed graphs


def test_torch_backend_on_cuda_matches(folders):
    from transformers import AutoConfig

    folder = folders["qwen2"]
    prompts = _prompts(AutoConfig.from_pretrained(folder).vocab_size)
    triton = _ours(folder, prompts, dtype="float32", enforce_eager=True)
    torch_sdpa = _ours(folder, prompts, dtype="float32", attention_backend="TORCH_SDPA")
    assert torch_sdpa == triton


def test_seeded_sampling_on_gpu(folders):
    from pagedllm import LLM, SamplingParams

    llm = LLM(folders["llama"], device="cuda", gpu_memory_utilization=0.3)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=7, max_tokens=16,
                       ignore_eos=True)
    a = llm.generate({"prompt_token_ids": [5, 6, 7]}, p, use_tqdm=False)[0].outputs[0]
    batch = llm.generate([{"prompt_token_ids": [9, 9]}, {"prompt_token_ids": [5, 6, 7]}],
                         [SamplingParams(max_tokens=30, ignore_eos=True), p], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == a.token_ids
