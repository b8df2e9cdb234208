"""FLASH_ATTN's start-up checks, on the CPU: it refuses to run there (naming TORCH_SDPA),
and its block-size, dtype and head-size constraints are met or named before any model loads.
The kernels themselves are tested on a GPU (tests/gpu/test_flash_attn.py)."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM
from pagedllm.attention.backends.flash_attn import (
    FlashAttentionBackend,
    cu_seqlens,
    window_sizes,
)
from pagedllm.attention.selector import (
    available_backends,
    check_attention_config,
    get_attention_backend,
)


def test_flash_attn_on_cpu_fails_at_start_up_naming_torch_sdpa(tiny_llama):
    with pytest.raises(ValueError) as e:
        LLM(tiny_llama, device="cpu", attention_backend="FLASH_ATTN")
    msg = str(e.value)
    assert "FLASH_ATTN" in msg and "TORCH_SDPA" in msg and "cpu" in msg


def test_flash_attn_env_var_on_cpu_is_refused(tiny_llama, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "flash_attn")
    with pytest.raises(ValueError, match="use attention_backend='TORCH_SDPA'"):
        LLM(tiny_llama, device="cpu")


def test_selector_on_cpu():
    assert available_backends("cpu") == ["TORCH_SDPA"]
    with pytest.raises(ValueError, match="cannot run on cpu; use attention_backend='TORCH_SDPA'"):
        get_attention_backend("FLASH_ATTN", "cpu")


def test_flashinfer_is_not_offered():
    """FLASHINFER has no implementation, so it is an unknown name like any other."""
    with pytest.raises(ValueError, match="'FLASHINFER' is unknown or not available"):
        get_attention_backend("FLASHINFER", "cpu")


def test_block_size_is_picked_or_named(monkeypatch):
    from pagedllm.attention.backends import flash_attn

    # Where only a gathering kernel exists (torch 2.11), any of the usual sizes works.
    monkeypatch.setattr(flash_attn, "paged_block_size", lambda: False)
    assert FlashAttentionBackend.resolve_block_size(None) == 16
    assert FlashAttentionBackend.resolve_block_size(32) == 32
    # Paged kernels (the flash_attn package, torch >= 2.13) need multiples of 256.
    monkeypatch.setattr(flash_attn, "paged_block_size", lambda: True)
    assert FlashAttentionBackend.resolve_block_size(None) == 256
    assert FlashAttentionBackend.resolve_block_size(512) == 512
    with pytest.raises(ValueError, match="block_size=16 is not supported by FLASH_ATTN.*"
                                         "--block-size 256"):
        FlashAttentionBackend.resolve_block_size(16)
    # The other backends keep their default and their sizes.
    assert check_attention_config(None, "cpu", None, torch.float32, 64) == 16
    assert check_attention_config("TORCH_SDPA", "cpu", 32, torch.float32, 64) == 32
    with pytest.raises(ValueError, match="block_size=256 is not supported by TORCH_SDPA"):
        check_attention_config("TORCH_SDPA", "cpu", 256, torch.float32, 64)


def test_engine_default_block_size_is_the_backends(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", num_gpu_blocks_override=64)
    assert llm.engine.config.cache.block_size == 16


def test_dtype_and_head_size_are_named():
    with pytest.raises(ValueError, match="not float32; pass dtype='bfloat16'"):
        FlashAttentionBackend.check_model(torch.float32, 128)
    with pytest.raises(ValueError, match="head sizes that are multiples of 8 up to 256; "
                                         "this model's is 260"):
        FlashAttentionBackend.check_model(torch.bfloat16, 260)
    with pytest.raises(ValueError, match="this model's is 36"):
        FlashAttentionBackend.check_model(torch.float16, 36)
    FlashAttentionBackend.check_model(torch.bfloat16, 128)


def test_kernels_found_in_this_torch():
    """torch's CPU build has the FlashAttention op's schema: at least the gathering
    kernel is offered (it is probed on a GPU only)."""
    from pagedllm.attention.backends.flash_attn import candidates

    labels = [k.label for k in candidates()]
    assert labels and all(f"PyTorch {torch.__version__}" in x or "package" in x
                          for x in labels)


def test_kernel_arguments():
    assert window_sizes(None) == (-1, -1)
    # SDPA reference: a query at p sees keys p - window + 1 .. p.
    assert window_sizes(4096) == (4095, 0)
    lens = torch.tensor([5, 1, 300], dtype=torch.int32)
    assert cu_seqlens(lens).tolist() == [0, 5, 6, 306]
    assert cu_seqlens(lens).dtype == torch.int32
