"""API contract points and request size limits, against `pagedllm serve` in a subprocess.

- /v1/completions logprobs=0 lists the sampled token in top_logprobs (echo included);
- streamed text_offset equals the non-streamed one while a stop string holds text back;
- seed outside int64 gives 400; "n": null means absent;
- fields pagedllm does not implement are refused with a 400 naming them;
- bodies over the limit and prompts far over max_model_len get 413, and /health keeps
  answering while a 20 MB body is refused.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from model_utils import make_tiny_model
from server_utils import RemoteServer

MODEL = "tiny"
MAX_MODEL_LEN = 256
PROMPT = "San Francisco is a"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("contract_llama"), "llama",
                           initializer_range=0.1)
    with RemoteServer(path, ["--served-model-name", MODEL, "--device", "cpu",
                             "--max-model-len", str(MAX_MODEL_LEN),
                             "--num-gpu-blocks-override", "256",
                             "--max-request-body-bytes", str(4 << 20),
                             "--disable-uvicorn-access-log"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.get_client()


def _post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url_for(path), json=body, timeout=60)


def _error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    return err


def test_logprobs_zero_lists_the_sampled_token(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=0,
                                    temperature=0, extra_body=NO_EOS)
    lp = out.choices[0].logprobs
    assert len(lp.top_logprobs) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top == {token: pytest.approx(value)}
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, logprobs=0,
                                       echo=True, temperature=0, extra_body=NO_EOS)
    lp = echoed.choices[0].logprobs
    assert lp.top_logprobs[0] is None  # the first prompt token has no logprob
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top is not None and top[token] == pytest.approx(value)


def test_streamed_text_offset_equals_non_streamed_under_a_stop_string(client):
    # A stop string that never matches still holds back its length - 1 characters.
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=24, logprobs=1, temperature=0,
                  stop=["@@@@@@@@"], extra_body=NO_EOS)
    full = client.completions.create(**kwargs).choices[0].logprobs
    offsets, tokens = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            offsets += chunk.choices[0].logprobs.text_offset
            tokens += chunk.choices[0].logprobs.tokens
    assert tokens == full.tokens
    assert offsets == full.text_offset


@pytest.mark.parametrize("seed", [1 << 63, -(1 << 63) - 1])
def test_seed_outside_int64_gives_400(server, seed):
    _error(_post(server, "v1/completions", {"model": MODEL, "prompt": PROMPT, "seed": seed}),
           400, "seed")


def test_n_null_means_absent(server):
    for path, body in (("v1/completions", {"prompt": PROMPT}),
                       ("v1/chat/completions", {"messages": [{"role": "user",
                                                              "content": "Hi"}]})):
        resp = _post(server, path, {"model": MODEL, "max_tokens": 2, "n": None, **body})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["choices"]) == 1


@pytest.mark.parametrize("field,value", [
    ("guided_decoding_backend", "xgrammar"),
    ("return_token_ids", True),
])
def test_unimplemented_fields_are_refused(server, field, value):
    for path, body in (("v1/completions", {"prompt": PROMPT}),
                       ("v1/chat/completions", {"messages": [{"role": "user",
                                                              "content": "Hi"}]})):
        err = _error(_post(server, path, {"model": MODEL, field: value, **body}), 400, field)
        assert field in err["message"]


@pytest.mark.parametrize("field,value", [
    ("guided_regex", "(a|b"),
    ("guided_json", {"type": "nonsense"}),
    ("guided_grammar", "root ::= ("),
    ("structured_outputs", {"choice": []}),
])
def test_bad_constraints_are_400_with_the_field(server, field, value):
    for path, body in (("v1/completions", {"prompt": PROMPT}),
                       ("v1/chat/completions", {"messages": [{"role": "user",
                                                              "content": "Hi"}]})):
        _error(_post(server, path, {"model": MODEL, field: value, **body}), 400, field)


def test_tools_with_auto_tool_choice_are_refused(server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Hi"}]
    for extra in ({}, {"tool_choice": "auto"}):
        err = _error(_post(server, "v1/chat/completions",
                           {"model": MODEL, "messages": messages, "tools": [tool], **extra}),
                     400, "tool_choice")
        assert "tool" in err["message"]
    resp = _post(server, "v1/chat/completions", {"model": MODEL, "messages": messages,
                                                 "tools": [tool], "tool_choice": "none",
                                                 "max_tokens": 2})
    assert resp.status_code == 200, resp.text


def test_stop_list_is_limited(server):
    _error(_post(server, "v1/completions", {"model": MODEL, "prompt": PROMPT,
                                            "stop": [f"s{i}" for i in range(65)]}), 400, "stop")
    _error(_post(server, "v1/completions", {"model": MODEL, "prompt": PROMPT,
                                            "stop": ["x" * 2000]}), 400, "stop")


def test_prompts_far_over_max_model_len_get_413(server):
    text = "hello world " * 3000  # far more than 4 x 256 tokens, well under the body limit
    _error(_post(server, "v1/completions", {"model": MODEL, "prompt": text}), 413, "prompt")
    ids = [5] * (4 * MAX_MODEL_LEN + 1)
    _error(_post(server, "v1/completions", {"model": MODEL, "prompt": ids}), 413, "prompt")
    _error(_post(server, "v1/chat/completions",
                 {"model": MODEL, "messages": [{"role": "user", "content": text}]}),
           413, "messages")
    # Just over max_model_len is the usual 400 about the context length.
    _error(_post(server, "v1/completions", {"model": MODEL, "prompt": [5] * 300}), 400)


def test_huge_body_gets_413_while_health_answers(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (20 << 20)}).encode()
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        result["resp"] = httpx.post(server.url_for("v1/completions"), content=body,
                                    headers={"Content-Type": "application/json"}, timeout=120)

    sender = threading.Thread(target=send)
    sender.start()
    health = [httpx.get(server.url_for("health"), timeout=30).status_code for _ in range(5)]
    sender.join(timeout=120)
    assert health == [200] * 5
    err = _error(result["resp"], 413)
    assert "--max-request-body-bytes" in err["message"]
    # A chunked body (no Content-Length) over the limit is cut off too.

    def chunks():
        for _ in range(6):
            yield b"x" * (1 << 20)

    resp = httpx.post(server.url_for("v1/completions"), content=chunks(),
                      headers={"Content-Type": "application/json"}, timeout=120)
    _error(resp, 413)
    assert httpx.get(server.url_for("health"), timeout=30).status_code == 200
