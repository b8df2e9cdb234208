"""GGUF files of the MoE, Gemma and Phi-3 families (qwen2moe, qwen3moe, gemma2, gemma3,
phi3): a tiny random HF model written as llama.cpp's converter would write it (stacked
experts, Gemma norms + 1, Phi-3's fused qkv / gate-up) loads with pagedllm's config equal
to transformers' and greedy tokens equal to HF transformers' on the original model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from parity_utils import generate, hf_greedy
from test_gguf_loader import _arch_metadata, _tiny_hf_model, _write_gguf

from pagedllm import LLM
from pagedllm.models.loader.gguf_loader import (
    GGUFCheckpoint,
    gguf_to_hf_config,
    iterate_gguf_weights,
)
from pagedllm.models.loader.gguf_reader import _GLOBAL_TENSOR_MAP, layer_tensor_map

NEW_TOKENS = 16
Q8 = gguf.GGMLQuantizationType.Q8_0
PROMPTS = [[5, 17, 33], [40, 2, 9, 71, 12, 60, 3], list(range(10, 41))]

# HF model_type -> (GGUF architecture, tiny-config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen3_moe": ("qwen3moe", dict(num_experts=8, num_experts_per_tok=2,
                                   moe_intermediate_size=32, norm_topk_prob=True)),
    "qwen2_moe": ("qwen2moe", dict(num_experts=8, num_experts_per_tok=2,
                                   moe_intermediate_size=32,
                                   shared_expert_intermediate_size=96, norm_topk_prob=False)),
    "gemma3_text": ("gemma3", dict(query_pre_attn_scalar=16, sliding_window=8,
                                   num_hidden_layers=3, head_dim=16,
                                   layer_types=["sliding_attention", "sliding_attention",
                                                "full_attention"],
                                   rope_parameters={
                                       "full_attention": {"rope_type": "default",
                                                          "rope_theta": 1000000.0},
                                       "sliding_attention": {"rope_type": "default",
                                                             "rope_theta": 10000.0}})),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16, sliding_window=8, head_dim=16,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "phi3": ("phi3", dict(partial_rotary_factor=0.5, pad_token_id=0, sliding_window=None)),
}


def _gguf_tensors(arch: str, state: dict[str, np.ndarray]) -> dict:
    """HF tensors -> llama.cpp's GGUF tensors: experts stacked, Gemma norm weights + 1."""
    to_gguf = {v: k for k, v in layer_tensor_map(arch).items()}
    to_global = {v: k for k, v in _GLOBAL_TENSOR_MAP.items()}
    out: dict[str, tuple[np.ndarray, None]] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, value in state.items():
        stem, kind = name.rsplit(".", 1)
        if arch.startswith("gemma") and stem.endswith("norm"):
            value = value + np.float32(1.0)
        if not stem.startswith("model.layers."):
            out[f"{to_global[stem.removeprefix('model.') if stem == 'lm_head' else stem]}.{kind}"
                ] = (value, None)
            continue
        _, _, layer, rest = stem.split(".", 3)
        if ".experts." in rest:  # mlp.experts.3.gate_proj
            _, _, expert, piece = rest.split(".")
            key = f"blk.{layer}.{to_gguf['mlp.experts.{expert}.' + piece]}.{kind}"
            stacks.setdefault(key, {})[int(expert)] = value
            continue
        if rest == "mlp.shared_expert_gate":
            value = value.reshape(-1)  # llama.cpp keeps it as an [H] vector
        out[f"blk.{layer}.{to_gguf[rest]}.{kind}"] = (value, None)
    for key, experts in stacks.items():
        out[key] = (np.stack([experts[e] for e in sorted(experts)]), None)
    return out


def _per_expert(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5's stacked experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) ->
    the per-expert HF names that Hub checkpoints (and the GGUF loader) use."""
    out = {}
    for name, value in state.items():
        prefix, _, piece = name.rpartition(".experts.")
        if not prefix or piece not in ("gate_up_proj", "down_proj"):
            out[name] = value
            continue
        for e in range(value.shape[0]):
            base = f"{prefix}.experts.{e}"
            if piece == "down_proj":
                out[f"{base}.down_proj.weight"] = value[e]
            else:
                gate, up = np.split(value[e], 2, axis=0)
                out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"] = gate, up
    return out


def _metadata(arch: str, cfg) -> dict:
    meta = _arch_metadata(arch, cfg)
    meta[f"{arch}.attention.key_length"] = cfg.head_dim
    meta[f"{arch}.attention.value_length"] = cfg.head_dim
    if arch.endswith("moe"):
        meta[f"{arch}.expert_count"] = cfg.num_experts
        meta[f"{arch}.expert_used_count"] = cfg.num_experts_per_tok
        meta[f"{arch}.expert_feed_forward_length"] = cfg.moe_intermediate_size
    if arch == "qwen2moe":
        meta[f"{arch}.expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
    if arch.startswith("gemma"):
        meta[f"{arch}.attention.sliding_window"] = cfg.sliding_window
    if arch == "gemma2":
        meta[f"{arch}.attn_logit_softcapping"] = float(cfg.attn_logit_softcapping)
        meta[f"{arch}.final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    if arch == "gemma3":
        meta[f"{arch}.attention.sliding_window_pattern"] = 3
    if arch == "phi3":
        meta[f"{arch}.rope.dimension_count"] = int(cfg.head_dim * cfg.partial_rotary_factor)
    return meta


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            arch, overrides = FAMILIES[model_type]
            tie = model_type.startswith("gemma")
            model = _tiny_hf_model(model_type, tie_word_embeddings=tie, **overrides)
            rng = np.random.default_rng(7)
            with torch.no_grad():  # spread norms and routers away from their init values
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.copy_(torch.from_numpy(
                            rng.uniform(-0.5, 0.5, p.shape).astype(np.float32)) + (
                                0.0 if tie else 1.0))
                    elif name.endswith("mlp.gate.weight"):
                        p.mul_(4.0)
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0
            state = _per_expert(
                {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
            if tie:
                state.pop("lm_head.weight", None)
            folder = tmp_path_factory.mktemp(arch)
            path = _write_gguf(folder / f"{arch}.gguf", arch, _metadata(arch, model.config),
                               _gguf_tensors(arch, state))
            cache[model_type] = (model, state, path)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_weights_and_config(family, model_type: str) -> None:
    from transformers import AutoConfig

    model, state, path = family(model_type)
    ours = dict(iterate_gguf_weights(path))
    assert set(ours) == set(state)
    for name, tensor in ours.items():
        assert tuple(tensor.shape) == state[name].shape, name
        assert np.allclose(tensor.numpy(), state[name], atol=1e-6, rtol=0), name
    cfg = gguf_to_hf_config(path)
    ref = model.config
    assert cfg.architectures == [type(model).__name__]
    assert cfg.model_type == ref.model_type
    fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
              "max_position_embeddings"]
    if model_type.endswith("moe"):
        fields += ["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                   "norm_topk_prob", "intermediate_size"]
    if model_type == "qwen2_moe":
        fields += ["shared_expert_intermediate_size"]
    if model_type.startswith("gemma"):
        fields += ["sliding_window", "layer_types", "query_pre_attn_scalar",
                   "attn_logit_softcapping", "final_logit_softcapping", "intermediate_size",
                   "rope_parameters"]
    if model_type == "phi3":
        fields += ["partial_rotary_factor", "sliding_window", "intermediate_size"]
    for field in fields:  # the file stores floats as float32
        want = getattr(ref, field)
        want = pytest.approx(want, rel=1e-6) if isinstance(want, float) else want
        assert getattr(cfg, field) == want, field
    # transformers' own GGUF config reader, on the fields it maps.
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert theirs.model_type == cfg.model_type
    mapped = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"]
    mapped += {"qwen3_moe": ["num_experts", "num_experts_per_tok", "head_dim",
                             "norm_topk_prob"],
               "qwen2_moe": ["num_experts", "num_experts_per_tok"],
               "gemma2": ["head_dim", "sliding_window", "intermediate_size"],
               "gemma3_text": ["head_dim", "sliding_window", "intermediate_size"],
               "phi3": ["intermediate_size"]}[model_type]
    for field in mapped:
        want = getattr(theirs, field)
        want = pytest.approx(want, rel=1e-6) if isinstance(want, float) else want
        assert getattr(cfg, field) == want, field


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_greedy_matches_transformers(family, model_type: str) -> None:
    model, _, path = family(model_type)
    expected = hf_greedy(model, PROMPTS, NEW_TOKENS)
    assert len({t for seq in expected for t in seq}) > 8  # not a degenerate repetition
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=128,
              skip_tokenizer_init=True)
    assert generate(llm, PROMPTS, NEW_TOKENS) == expected


def test_gemma_norms_are_stored_plus_one(family) -> None:
    """The file holds w + 1 (llama.cpp's converter); the loader gives HF's w back."""
    _, state, path = family("gemma3_text")
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    w = state["model.layers.0.self_attn.q_norm.weight"]
    assert np.allclose(stored["blk.0.attn_q_norm.weight"], w + 1)
    ours = dict(iterate_gguf_weights(path))
    assert np.allclose(ours["model.layers.0.self_attn.q_norm.weight"].numpy(), w, atol=1e-6)


def test_quantized_moe_dense_and_packed(family, tmp_path) -> None:
    """Q8_0 linear and expert tensors: the dense path gives the gguf package's dequantized
    values (expert stacks sliced per expert); the packed CPU path packs attention and the
    shared expert, dequantizes the experts, and generates."""
    model, state, _ = family("qwen2_moe")
    tensors = _gguf_tensors("qwen2moe", state)
    for name, (value, _) in list(tensors.items()):
        if value.ndim >= 2 and value.shape[-1] % 32 == 0 and "gate_inp" not in name:
            tensors[name] = (gguf.quants.quantize(value, Q8), Q8)
    path = _write_gguf(tmp_path / "q8.gguf", "qwen2moe", _metadata("qwen2moe", model.config),
                       tensors)
    ours = dict(iterate_gguf_weights(path))
    assert set(ours) == set(state)
    ckpt = GGUFCheckpoint(path)
    quantized = 0
    for name, (value, qtype) in tensors.items():
        if qtype != Q8:
            continue
        quantized += 1
        ref = gguf.quants.dequantize(value, Q8)
        hf = ckpt.hf_name(name)
        pieces = ([(hf.format(expert=e), ref[e]) for e in range(ref.shape[0])]
                  if "{expert}" in hf else [(hf, ref)])
        for hf_name, want in pieces:
            assert np.array_equal(ours[hf_name].numpy(), want), hf_name
    assert quantized >= 2 * 9  # q/k/v/o, three expert stacks, three shared-expert linears

    llm = LLM(str(path), device="cpu", dtype="float32", quantization="gguf",
              max_model_len=128, skip_tokenizer_init=True)
    layer = llm.engine.executor.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.packed is not None
    assert layer.mlp.shared_expert.gate_up_proj.packed is not None
    out = generate(llm, PROMPTS, NEW_TOKENS)
    assert [len(o) for o in out] == [NEW_TOKENS] * len(PROMPTS)


def test_phi3_packed_fused_and_longrope_refused(family, tmp_path) -> None:
    """Phi-3's fused qkv / gate-up tensors pack as one piece each; longrope files are
    refused with a message naming it."""
    model, state, _ = family("phi3")
    tensors = _gguf_tensors("phi3", state)
    for name, (value, _) in list(tensors.items()):
        if value.ndim == 2 and value.shape[-1] % 32 == 0:
            tensors[name] = (gguf.quants.quantize(value, Q8), Q8)
    meta = _metadata("phi3", model.config)
    path = _write_gguf(tmp_path / "phi3-q8.gguf", "phi3", meta, tensors)
    llm = LLM(str(path), device="cpu", dtype="float32", quantization="gguf",
              max_model_len=128, skip_tokenizer_init=True)
    layer = llm.engine.executor.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.packed is not None
    assert layer.mlp.gate_up_proj.packed is not None
    out = generate(llm, PROMPTS, NEW_TOKENS)
    assert [len(o) for o in out] == [NEW_TOKENS] * len(PROMPTS)

    factors = np.ones(model.config.head_dim // 4, dtype=np.float32)
    tensors["rope_factors_long.weight"] = (factors, None)
    tensors["rope_factors_short.weight"] = (factors, None)
    longrope = _write_gguf(tmp_path / "phi3-longrope.gguf", "phi3", meta, tensors)
    with pytest.raises(ValueError, match="phi3.*longrope"):
        gguf_to_hf_config(longrope)
