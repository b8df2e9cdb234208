"""LLM.chat options (conversations, chat_template, add_generation_prompt,
continue_final_message) and SamplingParams.output_kind (CUMULATIVE, DELTA, FINAL_ONLY)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import RequestOutputKind

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
CONV = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Who won the world series in 2020?"}]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, device="cpu")


def _prompt_text(llm: LLM, out) -> str:
    return llm.get_tokenizer().decode(out.prompt_token_ids)


def test_chat_renders_the_template_and_generates(llm):
    out = llm.chat(CONV, GREEDY, use_tqdm=False)[0]
    text = _prompt_text(llm, out)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWho won the world series in 2020?<|im_end|>" in text
    same = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY,
                        use_tqdm=False)[0]
    assert out.outputs[0].token_ids == same.outputs[0].token_ids


def test_chat_takes_a_list_of_conversations_and_params(llm):
    convs = [CONV, [{"role": "user", "content": "Hello"}], [{"role": "user", "content": "1 2 3"}]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4)]
    outs = llm.chat(convs, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3, 4]
    assert "Hello<|im_end|>" in _prompt_text(llm, outs[1])
    singles = [llm.chat(c, p, use_tqdm=False)[0] for c, p in zip(convs, params)]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in singles]


def test_chat_template_override_and_generation_prompt(llm):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    out = llm.chat(CONV, GREEDY, chat_template=template, use_tqdm=False)[0]
    assert _prompt_text(llm, out) == (
        "[system] You are a helpful assistant.\n"
        "[user] Who won the world series in 2020?\n[assistant]")
    out = llm.chat(CONV, GREEDY, chat_template=template, add_generation_prompt=False,
                   use_tqdm=False)[0]
    assert not _prompt_text(llm, out).endswith("[assistant]")
    out = llm.chat(CONV, GREEDY, add_generation_prompt=False, use_tqdm=False)[0]
    assert _prompt_text(llm, out).endswith("2020?<|im_end|>\n")


def test_continue_final_message(llm):
    conv = CONV + [{"role": "assistant", "content": "The Los Angeles"}]
    out = llm.chat(conv, GREEDY, add_generation_prompt=False, continue_final_message=True,
                   use_tqdm=False)[0]
    text = _prompt_text(llm, out)
    assert text.endswith("<|im_start|>assistant\nThe Los Angeles")
    closed = llm.chat(conv, GREEDY, add_generation_prompt=False, use_tqdm=False)[0]
    assert _prompt_text(llm, closed).endswith("The Los Angeles<|im_end|>\n")
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat(CONV, GREEDY, chat_template="not a template", use_tqdm=False)


def _collect(llm: LLM, kind: RequestOutputKind, n: int = 1) -> list:
    engine = llm.engine
    params = SamplingParams(temperature=0 if n == 1 else 1.0, seed=1, n=n, max_tokens=8,
                            ignore_eos=True, output_kind=kind)
    engine.add_request(f"kind-{kind.name}-{n}", "Hello, my name is", params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def test_output_kinds(llm):
    final = llm.generate("Hello, my name is", SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    cumulative = _collect(llm, RequestOutputKind.CUMULATIVE)
    assert len(cumulative) == 8 and cumulative[-1].finished
    assert not any(o.finished for o in cumulative[:-1])
    texts = [o.outputs[0].text for o in cumulative]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 9))
    assert cumulative[-1].outputs[0].text == final.text
    delta = _collect(llm, RequestOutputKind.DELTA)
    assert [len(o.outputs[0].token_ids) for o in delta] == [1] * 8
    assert "".join(o.outputs[0].text for o in delta) == final.text
    only = _collect(llm, RequestOutputKind.FINAL_ONLY)
    assert len(only) == 1 and only[0].finished
    assert only[0].outputs[0].token_ids == final.token_ids


def test_delta_outputs_of_n_samples(llm):
    cumulative = _collect(llm, RequestOutputKind.CUMULATIVE, n=3)[-1]
    delta = _collect(llm, RequestOutputKind.DELTA, n=3)
    for i in range(3):
        tokens = [t for o in delta for c in o.outputs if c.index == i for t in c.token_ids]
        text = "".join(c.text for o in delta for c in o.outputs if c.index == i)
        assert tokens == cumulative.outputs[i].token_ids
        assert text == cumulative.outputs[i].text


TOOLS_TEMPLATE = str(Path(__file__).parent / "data" / "smollm2_hermes_tools.jinja")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


def test_chat_passes_tools_and_template_kwargs(llm):
    conv = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [{"id": "call_7", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_7", "content": "cold"}]
    out = llm.chat(conv, GREEDY, chat_template=TOOLS_TEMPLATE, tools=[WEATHER_TOOL],
                   use_tqdm=False)[0]
    text = _prompt_text(llm, out)
    assert '<tools>\n{"name": "get_weather", "parameters"' in text
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text
    assert "<tool_response>\ncold\n</tool_response>" in text
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    template = "{{ messages[0]['content'] }}{% if shout %}!{% endif %}"
    out = llm.chat(CONV, GREEDY, chat_template=template,
                   chat_template_kwargs={"shout": True}, use_tqdm=False)[0]
    assert _prompt_text(llm, out) == "You are a helpful assistant.!"


def test_chat_refuses_bad_tools_and_tool_messages_naming_the_field(llm):
    with pytest.raises(ValueError, match=r"tools\.0\.function\.name"):
        llm.chat(CONV, GREEDY, tools=[{"type": "function", "function": {}}], use_tqdm=False)
    with pytest.raises(ValueError, match="tool message without tool_call_id"):
        llm.chat(CONV + [{"role": "tool", "content": "x"}], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
