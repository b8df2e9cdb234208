"""Every user-facing entry point rejects bad input with a ValueError that says how to fix it."""

from __future__ import annotations

import json
import os

import pytest

from pagedllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, device="cpu", max_model_len=128)


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -2}, "top_k must be >= -1"),
    ({"min_p": 2.0}, "min_p must be in [0, 1]"),
    ({"n": 0}, "n must be >= 1"),
    ({"presence_penalty": 3.0}, "presence_penalty must be in [-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens (5) must be <= max_tokens (2)"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"stop": [""]}, "stop must be"),
    ({"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2]"),
    ({"best_of": 1, "n": 2}, "best_of (1) must be >= n (2)"),
    ({"logprobs": -2}, "logprobs must be >= -1"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs must be an integer"),
    ({"logit_bias": {1: 150}}, "logit_bias values must be in [-100, 100]"),
    ({"logit_bias": {"x": 1}}, "logit_bias must map token ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids must not be empty"),
    ({"bad_words": ["ok", " "]}, "bad_words must be a list of non-empty strings"),
    ({"stop": "x", "detokenize": False}, "stop strings need detokenize=True"),
    ({"min_tokens": -1}, "min_tokens must be >= 0"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be >= 1"),
    ({"seed": "abc"}, "seed must be an integer"),
])
def test_sampling_params_rejects(kwargs, needle):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"logprobs": 21}, "logprobs=21 asks for more than max_logprobs=20"),
    ({"prompt_logprobs": 25}, "prompt_logprobs=25 asks for more than max_logprobs=20"),
    ({"logprobs": -1}, "-1 means the whole vocabulary"),
    ({"n": 200}, "more than max_num_seqs"),
    ({"stop_token_ids": [10 ** 6]}, "outside the vocabulary"),
    ({"logit_bias": {10 ** 6: 1.0}}, "outside the vocabulary"),
])
def test_engine_limits_rejected(llm, kwargs, needle):
    with pytest.raises(ValueError) as e:
        llm.generate("Hello", SamplingParams(**kwargs), use_tqdm=False)
    assert needle in str(e.value)
    assert not llm.engine.has_unfinished_requests()


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=4), use_tqdm=False)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"200 tokens, but max_model_len is 128"):
        llm.generate({"prompt_token_ids": [5] * 200}, SamplingParams(max_tokens=4),
                     use_tqdm=False)


def test_token_id_out_of_vocab(llm):
    with pytest.raises(ValueError, match="out of range"):
        llm.generate({"prompt_token_ids": [1, 10**6]}, use_tqdm=False)


def test_mismatched_params_list(llm):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(), SamplingParams()],
                     use_tqdm=False)


def test_bad_request_leaves_engine_usable(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine prompt", ""], SamplingParams(max_tokens=4), use_tqdm=False)
    out = llm.generate("fine prompt", SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert not llm.engine.scheduler.kv.req_blocks


def test_unknown_architecture(tiny_llama, tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    for name in os.listdir(tiny_llama):
        (folder / name).write_bytes((open(os.path.join(tiny_llama, name), "rb")).read())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported. Supported architectures: .*Llama"):
        LLM(str(folder), device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        LLM(str(tmp_path), device="cpu")


def test_missing_folder():
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/nonexistent/model/folder", device="cpu")


@pytest.mark.parametrize("kwargs, needle", [
    ({"dtype": "float64"}, "Unknown dtype"),
    ({"block_size": 12}, "block_size=12 is not supported"),
    ({"max_model_len": 100000}, "larger than the model's maximum context"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5 must be in (0, 1]"),
    ({"device": "tpu"}, "Unknown device"),
    ({"load_format": "onnx"}, "Unknown load_format"),
    ({"max_num_seqs": 0}, "max_num_seqs must be >= 1"),
    ({"attention_backend": "MAGIC"}, "Available here: TORCH_SDPA"),
    ({"num_gpu_blocks_override": 2}, "fewer than one request of max_model_len"),
    ({"not_an_arg": 1}, "Unknown LLM argument"),
    ({"max_cudagraph_capture_size": 0}, "max_cudagraph_capture_size must be an integer >= 1"),
    ({"max_cudagraph_capture_size": 8.5}, "max_cudagraph_capture_size must be an integer"),
])
def test_engine_args_rejected(tiny_llama, kwargs, needle):
    with pytest.raises(ValueError) as e:
        LLM(tiny_llama, device=kwargs.pop("device", "cpu"), **kwargs)
    assert needle in str(e.value)


def test_max_cudagraph_capture_size_reaches_the_device_config(tiny_llama):
    """The flag (vLLM's name) and the LLM argument set the decode graphs' largest batch;
    512 by default."""
    import argparse

    from pagedllm.config import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--max-cudagraph-capture-size", "1024"])
    assert args.max_cudagraph_capture_size == 1024
    config = EngineArgs(model=tiny_llama, device="cpu",
                        max_cudagraph_capture_size=1024).create_engine_config()
    assert config.device.max_cudagraph_capture_size == 1024
    default = EngineArgs(model=tiny_llama, device="cpu").create_engine_config()
    assert default.device.max_cudagraph_capture_size == 512


@pytest.mark.parametrize("memory_gib,name,usage,want", [
    (141, "NVIDIA H200", "offline", (1024, 16384, 1024)),
    (141, "NVIDIA H200", "server", (1024, 8192, 1024)),
    (80, "NVIDIA A100-SXM4-80GB", "offline", (256, 8192, 512)),
    (24, "NVIDIA L4", "server", (256, 8192, 512)),
])
def test_batch_defaults_follow_the_gpu(monkeypatch, memory_gib, name, usage, want):
    """Unset max_num_seqs / max_num_batched_tokens take vLLM's defaults for the card
    (1,024 sequences on 70 GiB or more other than an A100; 16,384 tokens offline there),
    and the graphs' default largest batch follows max_num_seqs up to 1,024."""
    from types import SimpleNamespace

    import torch

    from pagedllm.config import batch_defaults, default_capture_size

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(
        total_memory=memory_gib << 30, name=name))
    seqs, tokens = batch_defaults("cuda", usage)
    assert (seqs, tokens, default_capture_size(seqs)) == want
    assert batch_defaults("cpu", usage) == (128, 2048)


def test_unset_token_budget_covers_a_larger_max_num_seqs(tiny_llama):
    from pagedllm.config import EngineArgs

    config = EngineArgs(model=tiny_llama, device="cpu", max_num_seqs=4096).create_engine_config()
    assert config.scheduler.max_num_batched_tokens == 4096
    with pytest.raises(ValueError, match="usage must be one of offline, server"):
        EngineArgs(model=tiny_llama, device="cpu").create_engine_config(usage="batch")
