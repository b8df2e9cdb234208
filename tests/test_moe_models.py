"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): greedy parity with HF
transformers on tiny random models, also under preemption, chunked prefill and prefix hits;
top-k 1, 2 and 8; routing margins checked so that no near-tie decides a token; bad
checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY
from parity_utils import check_all_modes, generate, hf_model, reference_case
from safetensors.torch import load_file, save_file

from pagedllm import LLM

SHARED_PREFIX = 96
# name -> (HF model_type, config overrides)
MOE_MODELS: dict[str, tuple[str, dict]] = {
    # Mixtral: every layer MoE, renormalized top-2 of 4.
    "mixtral-top2": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2,
                                     intermediate_size=64)),
    # Qwen2-MoE: top-1 of 8 without renormalization, plus the gated shared expert.
    "qwen2_moe-top1": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=1,
                                         moe_intermediate_size=32,
                                         shared_expert_intermediate_size=96,
                                         norm_topk_prob=False)),
    # Qwen3-MoE: top-8 of 16, renormalized; layer 1 keeps a dense MLP (mlp_only_layers).
    "qwen3_moe-top8": ("qwen3_moe", dict(num_experts=16, num_experts_per_tok=8,
                                         moe_intermediate_size=32, norm_topk_prob=True,
                                         head_dim=16, mlp_only_layers=[1])),
    # Qwen3-MoE: top-2 of 8 without renormalization, every layer MoE.
    "qwen3_moe-top2": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=False,
                                         head_dim=16)),
}
# The smallest gap between the k-th and (k+1)-th routing probability that the tests accept:
# above the fp32 differences of the hidden states between the two implementations (~1e-7).
MIN_ROUTING_MARGIN = 1e-6
# Router weights are scaled up after HF's init so that routing probabilities are spread
# (decisions far from ties); the margin check then confirms it on every routed token.
ROUTER_SCALE = 2.0


def _spread_router(folder: str) -> None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    for name in tensors:
        if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
            tensors[name] = tensors[name] * ROUTER_SCALE
    save_file(tensors, path, metadata={"format": "pt"})


def _min_routing_margin(model, sequences: list[list[int]], top_k: int) -> float:
    """Smallest (k-th - (k+1)-th) routing probability over every token of every MoE layer
    while HF processes the full sequences (prompt + generated tokens)."""
    margin = float("inf")
    with torch.no_grad():
        for seq in sequences:
            out = model(torch.tensor([seq]), output_router_logits=True)
            for logits in out.router_logits:
                probs = torch.softmax(logits.float(), dim=-1)
                if top_k == probs.shape[-1]:
                    continue  # every expert is chosen: no selection to flip
                top = probs.topk(top_k + 1, dim=-1).values
                margin = min(margin, float((top[:, top_k - 1] - top[:, top_k]).min()))
    return margin


@pytest.fixture(scope="module")
def moe_case(tmp_path_factory):
    from model_utils import make_tiny_model

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model_type, overrides = MOE_MODELS[name]
            folder = make_tiny_model(tmp_path_factory.mktemp(name), model_type,
                                     **{**TINY, **overrides})
            _spread_router(folder)
            model = hf_model(folder)
            case = reference_case(folder, len(name), SHARED_PREFIX, model)
            _, prompts, expected, prefix_prompts, prefix_expected = case
            top_k = model.config.num_experts_per_tok
            sequences = [p + e for p, e in zip(prompts + prefix_prompts,
                                               expected + prefix_expected)]
            margin = _min_routing_margin(model, sequences, top_k)
            assert margin > MIN_ROUTING_MARGIN, (
                f"{name}: a routing decision is a near-tie ({margin:.2e}); pick another seed")
            cache[name] = case
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_moe_greedy_parity_all_modes(name, moe_case):
    folder, prompts, expected, prefix_prompts, prefix_expected = moe_case(name)
    check_all_modes(folder, prompts, expected, prefix_prompts, prefix_expected,
                    SHARED_PREFIX)


def test_moe_layers_are_built_as_configured(moe_case):
    from pagedllm.models.layers.fused_moe import FusedMoE
    from pagedllm.models.llama import LlamaMLP

    folder = moe_case("qwen3_moe-top8")[0]
    llm = LLM(folder, device="cpu", dtype="float32")
    layers = llm.engine.executor.runner.model.layers
    assert isinstance(layers[0].mlp.experts, FusedMoE)
    assert layers[0].mlp.experts.w13_weight.shape == (16, 64, 64)
    assert isinstance(layers[1].mlp, LlamaMLP)  # mlp_only_layers=[1]
    specs = llm.engine.executor.runner.model.kv_cache_specs()
    assert [(s.num_kv_heads, s.head_dim, s.sliding_window) for s in specs] == [(2, 16, None)] * 2


def _rewrite_checkpoint(folder: str, dest: str, edit) -> str:
    import shutil

    shutil.copytree(folder, dest)
    path = os.path.join(dest, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("case,name", [
    ("mixtral-top2", "model.layers.1.block_sparse_moe.experts.2.w3.weight"),
    ("qwen2_moe-top1", "model.layers.0.mlp.experts.7.down_proj.weight"),
])
def test_missing_expert_tensor_is_named(moe_case, tmp_path, case, name):
    bad = _rewrite_checkpoint(moe_case(case)[0], str(tmp_path / "bad"), lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LLM(bad, device="cpu", dtype="float32")


def test_stacked_expert_checkpoint_loads(moe_case, tmp_path):
    """A checkpoint with the experts already stacked (transformers-5 layout) gives the same
    tokens as the per-expert one."""
    folder, prompts, expected, _, _ = moe_case("qwen3_moe-top2")

    def stack(tensors: dict) -> None:
        for layer in range(2):
            p = f"model.layers.{layer}.mlp.experts"
            gate = [tensors.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)]
            up = [tensors.pop(f"{p}.{e}.up_proj.weight") for e in range(8)]
            down = [tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(8)]
            tensors[f"{p}.gate_up_proj"] = torch.stack(
                [torch.cat([g, u]) for g, u in zip(gate, up)]).contiguous()
            tensors[f"{p}.down_proj"] = torch.stack(down).contiguous()

    stacked = _rewrite_checkpoint(folder, str(tmp_path / "stacked"), stack)
    llm = LLM(stacked, device="cpu", dtype="float32")
    assert generate(llm, prompts[:3]) == expected[:3]


def test_top_k_larger_than_experts_is_refused(tmp_path):
    from model_utils import make_tiny_model

    folder = make_tiny_model(tmp_path, "qwen3_moe", **{**TINY, "num_experts": 4,
                                                       "num_experts_per_tok": 2,
                                                       "moe_intermediate_size": 32})
    import json

    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["num_experts_per_tok"] = 6
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="num_experts_per_tok=6"):
        LLM(folder, device="cpu", dtype="float32")
