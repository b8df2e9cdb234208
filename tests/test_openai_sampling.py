"""Logprobs, prompt logprobs, n / best_of, bad_words and range checks over HTTP with the
official `openai` client, against the same model run in-process."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_utils import RemoteServer

from pagedllm import LLM, SamplingParams

MODEL = "tiny"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Who won the world series in 2020?"}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def server(model_path):
    with RemoteServer(model_path, ["--served-model-name", MODEL, "--device", "cpu",
                                   "--max-model-len", "256", "--disable-uvicorn-access-log"]
                      ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.get_client()


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, device="cpu", max_model_len=256)


def _greedy(llm: LLM, prompt, **kwargs):
    params = SamplingParams(temperature=0, ignore_eos=True, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0]


def test_completion_logprobs_shape_and_values(client, llm):
    ref = _greedy(llm, PROMPT, max_tokens=6, logprobs=3).outputs[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                    logprobs=3, extra_body=NO_EOS)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token_id, step, got, top in zip(ref.token_ids, ref.logprobs, lp.token_logprobs,
                                        lp.top_logprobs):
        assert got == pytest.approx(step[token_id].logprob, abs=1e-5)
        assert len(top) == 3 and max(top.values()) == pytest.approx(got, abs=1e-5)
    # Streaming: the chunks' logprobs add up to the same lists.
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                       temperature=0, logprobs=3, stream=True,
                                       extra_body=NO_EOS)
    tokens, values, offsets = [], [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert values == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_echo_with_logprobs_covers_the_prompt(client, llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    ref = _greedy(llm, PROMPT, max_tokens=4, logprobs=2, prompt_logprobs=2)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=2, echo=True, extra_body=NO_EOS)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    steps = ref.prompt_logprobs[1:] + ref.outputs[0].logprobs
    for token_id, step, got, token, top in zip(ids[1:] + ref.outputs[0].token_ids, steps,
                                               lp.token_logprobs[1:], lp.tokens[1:],
                                               lp.top_logprobs[1:]):
        assert got == pytest.approx(step[token_id].logprob, abs=1e-5)
        # The 2 most likely tokens, plus the echoed / sampled one when it is not among them.
        assert top[token] == pytest.approx(got) and len(top) in (2, 3)
    assert lp.text_offset[0] == 0 and choice.text.startswith(PROMPT)
    assert choice.model_extra.get("prompt_logprobs") is None  # not asked for
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                       temperature=0, logprobs=2, echo=True, stream=True,
                                       extra_body=NO_EOS)
    tokens, values = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == lp.tokens and values[0] is None
    assert values[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_chat_logprobs_shape_and_streaming(client, llm):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body=NO_EOS)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    special = set(llm.get_tokenizer().get_added_vocab())  # in logprobs, not in the text
    assert "".join(c.token for c in content if c.token not in special) == (
        out.choices[0].message.content)
    for c in content:
        assert c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6)  # greedy
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True, extra_body=NO_EOS)
    streamed = [c for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content])
    # logprobs=false: no logprobs object at all.
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert out.choices[0].logprobs is None


def test_prompt_logprobs_in_responses(client, llm, server):
    ids = llm.get_tokenizer().encode(PROMPT)
    ref = _greedy(llm, PROMPT, max_tokens=2, prompt_logprobs=1).prompt_logprobs
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                    extra_body={**NO_EOS, "prompt_logprobs": 1})
    plp = out.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        entry = plp[pos][str(ids[pos])]
        assert entry["logprob"] == pytest.approx(ref[pos][ids[pos]].logprob, abs=1e-5)
        assert entry["rank"] == ref[pos][ids[pos]].rank
        assert entry["decoded_token"] == ref[pos][ids[pos]].decoded_token
    chat = httpx.post(server.url_for("v1/chat/completions"), timeout=60, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0})
    body = chat.json()
    assert chat.status_code == 200 and body["prompt_logprobs"][0] is None
    assert all(len(step) == 1 for step in body["prompt_logprobs"][1:])


def test_n_and_best_of(client, llm):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=4,
                                    temperature=1.0, extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert len({c.text for c in out.choices}) == 4
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, best_of=4,
                                    temperature=1.0, seed=7, extra_body=NO_EOS)
    ref = llm.generate(PROMPT, SamplingParams(n=2, best_of=4, temperature=1.0, seed=7,
                                              max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [o.text for o in ref.outputs]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, n=1, best_of=2, stream=True)
    assert e.value.body["param"] == "best_of"


def test_bad_words_over_http(client, llm):
    greedy = _greedy(llm, PROMPT, max_tokens=12).outputs[0].text
    word = greedy.split()[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={**NO_EOS, "bad_words": [word]})
    assert out.choices[0].text != greedy
    assert word not in out.choices[0].text.split()


@pytest.mark.parametrize("path,body,param", [
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"logprobs": -2}, "logprobs"),
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ("completions", {"best_of": 1, "n": 2}, "best_of"),
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"bad_words": [""]}, "bad_words"),
    ("completions", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat/completions", {"top_logprobs": 0}, None),
    ("chat/completions", {"presence_penalty": -3}, "presence_penalty"),
])
def test_range_checks_give_400(server, client, path, body, param):
    base = {"model": MODEL, "prompt": PROMPT} if path == "completions" else {
        "model": MODEL, "messages": MESSAGES}
    for stream in (False, True):
        resp = httpx.post(server.url_for("v1", path), timeout=60,
                          content=json.dumps({**base, **body, "stream": stream}),
                          headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["type"] == "BadRequestError" and err["message"]
        if param is not None:
            assert err["param"] == param, err
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert out.usage.completion_tokens >= 1  # still serving
