"""The OpenAI-compatible server against the real engine, through the official `openai` client.

A tiny random Llama (tests/model_utils.py) is served by `pagedllm serve` in a subprocess on
127.0.0.1 (free port); one more server checks the API key, and an in-process server checks
that a real fault gives a 500 without killing the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from model_utils import make_tiny_model
from server_utils import REPO_ROOT, RemoteServer, ThreadServer

# The tests run on CPU; PAGEDLLM_TEST_DEVICE=cuda runs the same servers on a GPU.
DEVICE = os.environ.get("PAGEDLLM_TEST_DEVICE", "cpu")
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
NUM_BLOCKS = 512
PROMPT = "San Francisco is a"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who won the world series in 2020?"},
]
# Sampling fields the openai client has no argument for.
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_server_llama"), "llama",
                           initializer_range=0.1)


@pytest.fixture(scope="module")
def server(model_path):
    srv = RemoteServer(model_path, [
        "--served-model-name", MODEL_NAME, "alias-name",
        "--device", DEVICE,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--num-gpu-blocks-override", str(NUM_BLOCKS),
        "--max-num-seqs", "64",
        "--disable-uvicorn-access-log",
    ])
    srv.start()
    yield srv
    code = srv.stop(signal.SIGTERM)
    log = srv.log()
    assert code == 0, f"server exited with {code} on SIGTERM:\n{log[-3000:]}"
    assert "Server stopped." in log
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.get_client()


@pytest.fixture(scope="module")
def llm(model_path):
    from pagedllm.entrypoints.llm import LLM

    return LLM(model_path, device=DEVICE, max_model_len=MAX_MODEL_LEN,
               num_gpu_blocks_override=128)


def _greedy(llm, prompt, max_tokens: int = 16, **kwargs):
    from pagedllm.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def _post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **server.headers(),
               **kwargs.pop("headers", {})}
    return httpx.post(server.url_for(path), content=content, headers=headers, timeout=60,
                      **kwargs)


def _assert_error(resp: httpx.Response, status: int, *, param: str | None = None,
                  contains: tuple[str, ...] = ()) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    for text in contains:
        assert text in err["message"], err["message"]
    return err


def _assert_serving(client) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                    temperature=0, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 2


def _sse_events(resp: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body; asserts the framing."""
    text = resp.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


# --------------------------------------------------------------------------- basics
def test_models_list(client, server, model_path):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME, "alias-name"]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "pagedllm"
    assert card.model_extra["root"] == model_path
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve("alias-name").id == "alias-name"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_version_stats(server):
    r = httpx.get(server.url_for("health"))
    assert r.status_code == 200
    r = httpx.get(server.url_for("version"))
    assert r.status_code == 200 and isinstance(r.json()["version"], str)
    stats = server.stats()
    assert stats["num_total_blocks"] == NUM_BLOCKS
    for key in ("num_running", "num_waiting", "num_free_blocks", "num_cached_blocks"):
        assert isinstance(stats[key], int)


def test_completion_shape_and_usage(client, server):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5,
                                    temperature=0, extra_body=NO_EOS)
    assert out.id.startswith("cmpl-")
    assert out.object == "text_completion"
    assert out.model == MODEL_NAME
    assert isinstance(out.created, int)
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length"
    tokens = _post(server, "tokenize", {"prompt": PROMPT}).json()
    assert out.usage.prompt_tokens == tokens["count"]
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == tokens["count"] + 5
    # Any served name works; the response reports the one asked for.
    assert client.completions.create(model="alias-name", prompt=PROMPT,
                                     max_tokens=1).model == "alias-name"


def test_greedy_completion_matches_llm_generate(client, llm):
    for prompt in (PROMPT, "The capital of France is", "Hello"):
        expected = _greedy(llm, prompt, max_tokens=24, ignore_eos=True)
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24,
                                        temperature=0, extra_body=NO_EOS)
        assert out.choices[0].text == expected.text
    # Token-id prompts and the default stopping on EOS give the same result too.
    ids = llm.get_tokenizer().encode("Once upon a time")
    expected = _greedy(llm, {"prompt_token_ids": ids}, max_tokens=32)
    out = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=32,
                                     temperature=0)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.completion_tokens == len(expected.token_ids)


def test_list_prompts_and_n(client, llm):
    tok = llm.get_tokenizer()
    prompts = ["Hello, my name is", "The quick brown fox"]
    expected = [_greedy(llm, p, max_tokens=6, ignore_eos=True).text for p in prompts]
    out = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6,
                                    temperature=0, extra_body=NO_EOS)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == expected
    ids = [tok.encode(p) for p in prompts]
    out = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, n=2,
                                    temperature=0, extra_body=NO_EOS)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert out.usage.prompt_tokens == sum(len(i) for i in ids)
    assert out.usage.completion_tokens == 4 * 6
    # n=2 with sampling: two choices of the requested length.
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, n=2,
                                    temperature=1.0, seed=3, extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 16


def test_echo(client, llm):
    expected = _greedy(llm, PROMPT, max_tokens=5, ignore_eos=True).text
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5,
                                    temperature=0, echo=True, extra_body=NO_EOS)
    assert out.choices[0].text == PROMPT + expected
    ids = llm.get_tokenizer().encode(PROMPT)
    out = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5,
                                    temperature=0, echo=True, extra_body=NO_EOS)
    assert out.choices[0].text == PROMPT + expected
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5,
                                       temperature=0, echo=True, stream=True,
                                       extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in stream if c.choices) == PROMPT + expected


def test_stop_strings_and_stop_token_ids(client, llm):
    full = _greedy(llm, PROMPT, max_tokens=24, ignore_eos=True)
    text = full.text
    # A stop string that first occurs a few characters into the output.
    start = next(i for i in range(3, len(text) - 2) if text[i:i + 2].strip() == text[i:i + 2])
    stop = text[start:start + 2]
    cut = text.find(stop)
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24,
                                    temperature=0, stop=[stop, "zzzz-never"],
                                    extra_body=NO_EOS)
    choice = out.choices[0]
    assert choice.text == text[:cut]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24,
                                    temperature=0, stop=stop,
                                    extra_body={**NO_EOS, "include_stop_str_in_output": True})
    assert out.choices[0].text == text[:cut + len(stop)]
    # Streaming honours the stop string as well.
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24,
                                       temperature=0, stop=stop, stream=True,
                                       extra_body=NO_EOS)
    chunks = [c for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # stop_token_ids: stop at the 4th generated token.
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24,
                                    temperature=0,
                                    extra_body={**NO_EOS, "stop_token_ids": [stop_id]})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop_id
    assert out.usage.completion_tokens == first + 1


def test_sampling_fields_pass_through(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9,
                  seed=1234, frequency_penalty=0.5, presence_penalty=0.2)
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
             **NO_EOS}
    a = client.completions.create(**kwargs, extra_body=extra)
    b = client.completions.create(**kwargs, extra_body=extra)
    assert a.choices[0].text == b.choices[0].text  # same seed, same text
    assert a.usage.completion_tokens == 8
    # Fields SamplingParams validates are checked, not dropped.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT,
                                  extra_body={"repetition_penalty": -1.0})
    assert "repetition_penalty" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                  extra_body={"min_tokens": 5})


def test_logprobs_requests_are_accepted(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3,
                                    temperature=0, logprobs=2, extra_body=NO_EOS)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=1000)


def test_streaming_completion(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                     temperature=0, extra_body=NO_EOS)
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body=NO_EOS)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" for c in chunks)
    body, last = chunks[:-1], chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])


def test_streaming_sse_framing(server):
    resp = _post(server, "v1/completions", {
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "stream": True, "n": 2,
        "ignore_eos": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # only with include_usage
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finished) == [0, 1]


# --------------------------------------------------------------------------- chat
def test_chat_completion(client, server, llm):
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                         temperature=0, extra_body=NO_EOS)
    assert out.id.startswith("chatcmpl-")
    assert out.object == "chat.completion"
    assert out.model == MODEL_NAME
    choice = out.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    # The prompt is the tokenizer's chat template with the generation prompt.
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 10
    tokenized = _post(server, "tokenize", {"model": MODEL_NAME, "messages": MESSAGES}).json()
    assert tokenized["tokens"] == ids
    expected = _greedy(llm, {"prompt_token_ids": ids}, max_tokens=10, ignore_eos=True)
    assert choice.message.content == expected.text
    # llm.chat renders the same prompt.
    assert llm.chat(MESSAGES, _params(max_tokens=10), use_tqdm=False)[0].outputs[0].text \
        == expected.text


def _params(**kwargs):
    from pagedllm.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, ignore_eos=True, **kwargs)


def test_chat_max_tokens_fields(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                         max_completion_tokens=3, temperature=0,
                                         extra_body=NO_EOS)
    assert out.usage.completion_tokens == 3
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                         temperature=0, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 4
    # max_completion_tokens wins over the deprecated max_tokens.
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=9,
                                         max_completion_tokens=2, temperature=0,
                                         extra_body=NO_EOS)
    assert out.usage.completion_tokens == 2
    # Without a limit the reply may fill the context.
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                         extra_body=NO_EOS)
    assert out.usage.total_tokens == MAX_MODEL_LEN
    assert out.choices[0].finish_reason == "length"


def test_chat_streaming(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8,
                                          temperature=0, n=2, extra_body=NO_EOS)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8,
                                            temperature=0, n=2, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body=NO_EOS)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert all(ch.delta.role is None for ch in mine[1:])
        assert "".join(ch.delta.content or "" for ch in mine) == \
            full.choices[index].message.content
        assert mine[-1].finish_reason == "length"
        assert all(ch.finish_reason is None for ch in mine[:-1])


def test_chat_content_parts_and_template_options(client, server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Who won"},
                                          {"type": "text", "text": "the series?"}]}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=2)
    assert out.choices[0].message.role == "assistant"
    # add_generation_prompt=False + continue_final_message renders the partial reply.
    msgs = MESSAGES + [{"role": "assistant", "content": "The"}]
    body = {"model": MODEL_NAME, "messages": msgs, "add_generation_prompt": False,
            "continue_final_message": True}
    tokens = _post(server, "tokenize", body).json()["tokens"]
    text = _post(server, "detokenize", {"tokens": tokens}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nThe")
    resp = _post(server, "v1/chat/completions", {**body, "max_tokens": 2, "echo": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith("The")
    # Image parts are refused with a clear 400.
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    err = _assert_error(_post(server, "v1/chat/completions",
                              {"model": MODEL_NAME, "messages": bad}), 400)
    assert "text" in err["message"]


# --------------------------------------------------------------------------- tokenize
def test_tokenize_detokenize(server, llm):
    tok = llm.get_tokenizer()
    r = _post(server, "tokenize", {"model": MODEL_NAME, "prompt": PROMPT,
                                   "return_token_strs": True})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tok.encode(PROMPT)
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    r = _post(server, "detokenize", {"model": MODEL_NAME, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT}
    _assert_error(_post(server, "detokenize", {"tokens": [10 ** 9]}), 400, param="tokens")
    _assert_error(_post(server, "tokenize", {"model": "nope", "prompt": "x"}), 404)


# --------------------------------------------------------------------------- concurrency
async def _stream_many(server, n_total: int, n_close: int) -> tuple[list[str], list[int]]:
    client = server.get_async_client()
    full_len, cut_len = 24, MAX_MODEL_LEN - 16

    async def run(i: int) -> tuple[str, int]:
        close_early = i < n_close
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=f"Request number {i} says", temperature=0,
            max_tokens=cut_len if close_early else full_len, stream=True,
            stream_options={"include_usage": True}, extra_body=NO_EOS)
        text, seen = "", 0
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                seen += 1
            if chunk.usage is not None:
                usage = chunk.usage
            if close_early and seen >= 3:
                await stream.close()
                return "closed", seen
        assert usage is not None and usage.completion_tokens == full_len
        return text, usage.completion_tokens

    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(run(i) for i in range(n_total))), timeout=240)
    finally:
        await client.close()
    return [r[0] for r in results], [r[1] for r in results]


def test_concurrent_streams_and_aborts_free_blocks(server, llm):
    start = time.monotonic()
    texts, counts = asyncio.run(_stream_many(server, 32, 8))
    assert texts[:8] == ["closed"] * 8
    # The 24 completed streams carry the same text as offline greedy generation.
    for i in (8, 20, 31):
        expected = _greedy(llm, f"Request number {i} says", max_tokens=24, ignore_eos=True)
        assert texts[i] == expected.text
    assert counts[8:] == [24] * 24
    # The 8 closed requests (asked for 240 tokens) were aborted, not run to the end.
    stats = server.wait_idle(timeout=30)
    elapsed = time.monotonic() - start
    assert stats["num_free_blocks"] == stats["num_total_blocks"] == NUM_BLOCKS, stats
    assert stats["num_cached_blocks"] <= stats["num_free_blocks"]
    _assert_serving(server.get_client())
    assert elapsed < 240


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body,param", [
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 2}, "top_p"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "top_k": -5}, "top_k"),
    ({"prompt": PROMPT, "min_p": 1.5}, "min_p"),
    ({"prompt": PROMPT, "stop": [""]}, None),
    ({"prompt": PROMPT, "max_tokens": "abc"}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "n": 1.5}, "n"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": PROMPT, "stream": False, "stream_options": {"include_usage": True}}, None),
    ({"prompt": PROMPT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": PROMPT, "stop_token_ids": [99999]}, "stop_token_ids"),
    ({"prompt": PROMPT, "use_beam_search": True}, "use_beam_search"),
    ({"prompt": PROMPT, "suffix": "x"}, "suffix"),
    ({"prompt": PROMPT, "response_format": {"type": "yaml"}}, "response_format"),
    ({"prompt": PROMPT, "structured_outputs": {"regex": "(a|b"}}, "structured_outputs"),
    ({"prompt": PROMPT, "guided_choice": []}, "guided_choice"),
])
def test_invalid_completion_fields_give_400(server, client, body, param):
    err = _assert_error(_post(server, "v1/completions", {"model": MODEL_NAME, **body}), 400,
                        param=param)
    assert err["type"] == "BadRequestError"
    # The same body as a stream fails before any event is sent.
    if "stream_options" not in body:
        _assert_error(_post(server, "v1/completions",
                            {"model": MODEL_NAME, **body, "stream": True}), 400, param=param)
    _assert_serving(client)


@pytest.mark.parametrize("body,param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": MESSAGES, "top_logprobs": 2}, None),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 1000}, "top_logprobs"),
    ({"messages": MESSAGES, "tool_choice": "required"}, "tools"),
    ({"messages": MESSAGES, "chat_template": "{{ raise_exception('bad template') }}"},
     "messages"),
])
def test_invalid_chat_fields_give_400(server, client, body, param):
    _assert_error(_post(server, "v1/chat/completions", {"model": MODEL_NAME, **body}), 400,
                  param=param)
    _assert_serving(client)


def test_context_length_errors(server, client, llm):
    n_prompt = len(llm.get_tokenizer().encode(PROMPT))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_MODEL_LEN)
    message = str(e.value)
    assert str(MAX_MODEL_LEN) in message and str(MAX_MODEL_LEN + n_prompt) in message
    assert e.value.body["param"] == "max_tokens"
    long_prompt = [7] * MAX_MODEL_LEN
    err = _assert_error(_post(server, "v1/completions",
                              {"model": MODEL_NAME, "prompt": long_prompt}), 400)
    assert str(MAX_MODEL_LEN) in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                       max_completion_tokens=MAX_MODEL_LEN)
    assert str(MAX_MODEL_LEN) in str(e.value)
    # truncate_prompt_tokens keeps the tail of a long prompt.
    out = client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=2,
                                    extra_body={"truncate_prompt_tokens": 10})
    assert out.usage.prompt_tokens == 10
    _assert_serving(client)


def test_unknown_model_gives_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.body["param"] == "model" and "gpt-4" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    err = _assert_error(_post(server, "v1/chat/completions",
                              {"model": "gpt-4", "messages": MESSAGES, "stream": True}), 404)
    assert err["type"] == "NotFoundError"
    _assert_serving(client)


def test_malformed_requests_give_400_not_500(server, client):
    for raw in ("{not json", "", "[1, 2]", "null", '"text"', "{\"prompt\": \"x\",}"):
        _assert_error(_post(server, "v1/completions", raw), 400)
        _assert_error(_post(server, "v1/chat/completions", raw), 400)
        _assert_error(_post(server, "tokenize", raw), 400)
    # Form-encoded body (curl -d without a JSON content type).
    r = httpx.post(server.url_for("v1/completions"), data={"prompt": "x"})
    err = _assert_error(r, 400)
    assert "JSON" in err["message"]
    # Invalid UTF-8.
    _assert_error(_post(server, "v1/completions", b"\xff\xfe{"), 400)
    # Unknown routes and methods keep the OpenAI error shape.
    _assert_error(httpx.get(server.url_for("v1/nothing")), 404)
    _assert_error(httpx.get(server.url_for("v1/completions")), 405)
    _assert_serving(client)


def test_unknown_fields_are_ignored(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                    user="me", extra_body={"not_a_field": 1})
    assert len(out.choices) == 1


# --------------------------------------------------------------------------- API key
@pytest.fixture(scope="module")
def key_server(model_path):
    # The key comes from the environment; the server runs through `python -m ...api_server`.
    srv = RemoteServer(model_path, ["--device", DEVICE, "--max-model-len", "128",
                                    "--num-gpu-blocks-override", "64"],
                       module="pagedllm.entrypoints.openai.api_server",
                       env={"PAGEDLLM_API_KEY": "sk-test-key"}, api_key="sk-test-key")
    srv.start()
    yield srv
    code = srv.stop(signal.SIGINT)
    assert code == 0, srv.log()[-3000:]


def test_api_key(key_server, model_path):
    good = key_server.get_client()
    assert [m.id for m in good.models.list().data] == [model_path]
    out = good.completions.create(model=model_path, prompt=PROMPT, max_tokens=2)
    assert out.usage.completion_tokens <= 2
    with pytest.raises(openai.AuthenticationError):
        key_server.get_client(api_key="sk-wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        key_server.get_client(api_key="sk-test-key-but-longer").completions.create(
            model=model_path, prompt=PROMPT, max_tokens=2)
    for path, method in (("v1/models", "GET"), ("v1/completions", "POST"), ("tokenize", "POST"),
                         ("stats", "GET"), ("version", "GET")):
        resp = httpx.request(method, key_server.url_for(path), json={"prompt": "x"})
        err = _assert_error(resp, 401)
        assert err["type"] == "AuthenticationError"
        assert resp.headers["www-authenticate"] == "Bearer"
    resp = httpx.get(key_server.url_for("v1/models"), headers={"Authorization": "Basic abc"})
    _assert_error(resp, 401)
    # /health stays open; the server keeps serving after the refusals.
    assert httpx.get(key_server.url_for("health")).status_code == 200
    assert good.models.list().data


# --------------------------------------------------------------------------- in-process
class _SpyEngine:
    """Wraps a real AsyncLLM for in-process tests.

    Records which request ids the front-end sends to the engine core as aborts, counts the
    tokens each request got from the core and how it finished there, can slow the core's
    steps down (`set_step_delay`), and makes `generate` raise a RuntimeError while `fail`
    is set (a real server fault).
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self.fail = False
        self.aborted: list[str] = []
        self.tokens: dict[str, int] = {}
        self.finished: dict[str, list[str | None]] = {}
        client = engine.client
        abort, on_outputs = client.abort, client.on_outputs

        def spy_outputs(msg):
            for out in msg.outputs:
                self.tokens[out.request_id] = (self.tokens.get(out.request_id, 0)
                                               + len(out.new_token_ids))
                if out.finish_reason is not None:
                    self.finished[out.request_id] = [out.finish_reason]
            on_outputs(msg)

        def spy_abort(request_ids, reason="abort"):
            self.aborted.extend(request_ids)
            return abort(request_ids, reason)

        client.abort, client.on_outputs = spy_abort, spy_outputs

    def set_step_delay(self, seconds: float) -> None:
        """Make the engine core sleep this long before each step (blocks until set)."""
        asyncio.run_coroutine_threadsafe(self._engine.client.call("set_step_delay", seconds),
                                         self.loop).result(timeout=30)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def generate(self, prompt, params, request_id):
        async for out in self._engine.generate(prompt, params, request_id):
            if self.fail:
                raise RuntimeError("injected fault")
            yield out


@pytest.fixture(scope="module")
def inproc(model_path):
    """(ThreadServer, _SpyEngine): build_app around a real AsyncLLM in this process."""
    import argparse

    from pagedllm.config import EngineArgs
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app

    engine = AsyncLLM.from_engine_args(EngineArgs(
        model=model_path, device=DEVICE, max_model_len=MAX_MODEL_LEN,
        num_gpu_blocks_override=NUM_BLOCKS))
    spy = _SpyEngine(engine)
    args = argparse.Namespace(served_model_name=["m"], api_key="k2", chat_template=None)
    try:
        with ThreadServer(build_app(spy, args), api_key="k2") as srv:
            spy.loop = srv.loop
            yield srv, spy
    finally:
        engine.shutdown()


async def _close_some_streams(srv, n_total: int, n_close: int, max_tokens: int) -> list[int]:
    client = srv.get_async_client()

    async def run(i: int) -> int:
        stream = await client.completions.create(
            model="m", prompt=f"Request {i}", max_tokens=max_tokens, stream=True,
            extra_body=NO_EOS, extra_headers={"X-Request-Id": f"r{i}"})
        seen = 0
        async for chunk in stream:
            seen += len(chunk.choices)
            if i < n_close and seen >= 3:
                await stream.close()
                break
        return seen

    try:
        return await asyncio.wait_for(
            asyncio.gather(*(run(i) for i in range(n_total))), timeout=240)
    finally:
        await client.close()


def test_closed_streams_are_aborted_in_the_engine(inproc):
    srv, spy = inproc
    spy.set_step_delay(0.01)  # 200 tokens take > 2 s: a closed stream cannot finish first
    try:
        seen = asyncio.run(_close_some_streams(srv, 32, 8, max_tokens=200))
    finally:
        spy.set_step_delay(0.0)
    assert seen[:8] == [3] * 8
    closed = {f"cmpl-r{i}-0" for i in range(8)}
    assert closed <= set(spy.aborted)
    for rid in closed:
        assert rid not in spy.finished and spy.tokens.get(rid, 0) < 200, rid
    for i in range(8, 32):
        assert spy.finished[f"cmpl-r{i}-0"] == ["length"]
        assert spy.tokens[f"cmpl-r{i}-0"] == 200
    stats = srv.wait_idle(timeout=30)
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats


def test_non_streaming_disconnect_is_aborted_in_the_engine(inproc):
    srv, spy = inproc
    spy.set_step_delay(0.01)
    try:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                "n": 3, "request_id": "gone"}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url_for("v1/completions"), json=body, headers=srv.headers(),
                       timeout=0.5)
        stats = srv.wait_idle(timeout=10)
    finally:
        spy.set_step_delay(0.0)
    assert "cmpl-gone-0" in spy.aborted
    assert "cmpl-gone-0" not in spy.finished
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats


def test_server_fault_gives_500_and_engine_survives(inproc):
    srv, spy = inproc
    client = srv.get_client()
    spy.fail = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m", prompt=PROMPT, max_tokens=4)
        assert e.value.body["type"] == "InternalServerError"
        assert "injected" not in e.value.body["message"]  # details stay in the log
        resp = _post(srv, "v1/chat/completions", {"model": "m", "messages": MESSAGES,
                                                  "stream": True, "max_tokens": 4})
        assert resp.status_code == 200
        events = _sse_events(resp)
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and error["type"] == "InternalServerError"
    finally:
        spy.fail = False
    assert httpx.get(srv.url_for("health")).status_code == 200
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 3
    stats = srv.wait_idle()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_health_reports_a_dead_engine(inproc):
    srv, spy = inproc

    async def dead() -> None:
        raise RuntimeError("engine loop died")

    spy.check_health = dead
    try:
        err = _assert_error(httpx.get(srv.url_for("health")), 503)
        assert "engine" in err["message"]
    finally:
        del spy.check_health
    assert httpx.get(srv.url_for("health")).status_code == 200


def test_drain_on_shutdown_ends_streams_cleanly(inproc):
    """What SIGTERM does first: running streams end with finish_reason "abort" + [DONE]."""
    srv, spy = inproc
    streams = srv.server.config.app.state.streams
    spy.set_step_delay(0.01)
    try:
        with httpx.stream("POST", srv.url_for("v1/chat/completions"), headers=srv.headers(),
                          json={"model": "m", "messages": MESSAGES, "max_tokens": 200, "n": 2,
                                "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}},
                          timeout=30) as resp:
            lines = resp.iter_lines()
            events = [next(x for x in lines if x)]  # the first chunk: generation is running
            assert len(streams) == 1
            _call_in_server_loop(srv, streams.drain)
            events += [x for x in lines if x]
        body = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert events[-1] == "data: [DONE]"
        reasons = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                   for c in body if c["choices"] and c["choices"][0]["finish_reason"]}
        assert reasons == {0: "abort", 1: "abort"}
        assert body[-1]["choices"] == [] and body[-1]["usage"]["completion_tokens"] < 400
        # While draining, new generations are refused with 503.
        resp = _post(srv, "v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 2})
        _assert_error(resp, 503)
        stats = srv.wait_idle(timeout=10)
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
    finally:
        spy.set_step_delay(0.0)
        streams.draining = False
    _assert_serving_model(srv, "m")


def _call_in_server_loop(srv, fn) -> None:
    """Run `fn()` on the event loop of a ThreadServer and wait for it."""
    import concurrent.futures

    loop = srv.loop
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        fn()
        done.set_result(None)

    loop.call_soon_threadsafe(run)
    done.result(timeout=10)


def _assert_serving_model(srv, model: str) -> None:
    out = srv.get_client().completions.create(model=model, prompt=PROMPT, max_tokens=2,
                                              extra_body=NO_EOS)
    assert out.usage.completion_tokens == 2


def test_api_key_from_args(inproc):
    srv, _ = inproc
    assert srv.get_client().models.list().data[0].id == "m"
    with pytest.raises(openai.AuthenticationError):
        srv.get_client(api_key="k3").models.list()
    assert httpx.get(srv.url_for("health")).status_code == 200


# --------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_cli_help():
    top = _cli("--help")
    assert top.returncode == 0 and "serve" in top.stdout
    serve = _cli("serve", "--help")
    assert serve.returncode == 0
    for flag in ("--host", "--port", "--served-model-name", "--api-key", "--max-model-len",
                 "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
                 "--gpu-memory-utilization", "--dtype", "--device", "--seed",
                 "--enforce-eager", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--attention-backend", "--chat-template", "--load-format", "--log-level",
                 "PAGEDLLM_API_KEY", "0.0.0.0", "127.0.0.1", "/stats"):
        assert flag in serve.stdout, flag
    assert _cli().returncode == 2


def test_cli_args_reach_engine_args():
    from pagedllm.entrypoints.cli import build_parser
    from pagedllm.entrypoints.openai.api_server import engine_args_from

    args = build_parser().parse_args([
        "serve", "some/model", "--served-model-name", "a", "b", "--max-model-len", "99",
        "--block-size", "32", "--no-enable-prefix-caching", "--dtype", "float32",
        "--chat-template", "{{ messages }}", "--enforce-eager", "--seed", "7"])
    assert args.host == "127.0.0.1" and args.port == 8000
    args.model = args.model_tag
    engine_args = engine_args_from(args)
    assert engine_args.model == "some/model"
    assert engine_args.served_model_name == "a"
    assert engine_args.max_model_len == 99 and engine_args.block_size == 32
    assert engine_args.enable_prefix_caching is False and engine_args.enforce_eager is True
    assert engine_args.dtype == "float32" and engine_args.seed == 7
    assert engine_args.chat_template == "{{ messages }}"
