"""FLASH_ATTN on CUDA: the backend's forward against TORCH_SDPA's (fp32) on the same mixed
batches, decode graphs against eager, and greedy bf16 parity with HF end to end."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

TOL = 1e-2


def _block_size() -> int:
    from pagedllm.attention.backends.flash_attn import FlashAttentionBackend

    return FlashAttentionBackend.resolve_block_size(None)  # 256 (paged) or 16 (gathered)


BLOCK = _block_size()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _batch(q_lens: list[int], seq_lens: list[int], hq: int, hkv: int, d: int,
           dtype: torch.dtype, seed: int, num_blocks: int | None = None,
           width: int | None = None):
    """A paged cache over shuffled blocks, the step's new q/k/v and its metadata."""
    from pagedllm.attention.backends.abstract import AttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(s / BLOCK) for s in seq_lens]
    num_blocks = num_blocks or sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), width or max(need), dtype=torch.int32)
    pos = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[pos:pos + n].to(torch.int32)
        pos += n
    kv = torch.randn(2, num_blocks, BLOCK, hkv, d, generator=gen).to("cuda", dtype)
    t = sum(q_lens)
    q, k, v = (torch.randn(t, h, d, generator=gen).to("cuda", dtype) for h in (hq, hkv, hkv))
    slots = []
    for i, (ql, sl) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for p in range(sl - ql, sl):
            slots.append(int(table[i, p // BLOCK]) * BLOCK + p % BLOCK)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=t, num_reqs=len(q_lens), max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), query_start_loc=qsl.cuda(), seq_lens=seq.cuda(),
        block_table=table.cuda(), slot_mapping=torch.tensor(slots).cuda(),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq, is_decode_only=max(q_lens) == 1)
    return q, k, v, kv, md


def _flash_vs_sdpa(q_lens, seq_lens, hq, hkv, d, dtype, window, seed=0, kernel=None) -> float:
    """Relative error of FLASH_ATTN's forward (or of one given kernel after the same cache
    write) against TORCH_SDPA's in fp32 on the same step."""
    from pagedllm.attention.backends.flash_attn import FlashAttentionImpl, window_sizes
    from pagedllm.attention.backends.torch_sdpa import TorchSDPAImpl
    from pagedllm.attention.ops.triton_reshape_and_cache import reshape_and_cache

    q, k, v, kv, md = _batch(q_lens, seq_lens, hq, hkv, d, dtype, seed)
    scale = d**-0.5
    ref_cache = kv.float()
    if kernel is None:
        out = FlashAttentionImpl(hq, d, scale, hkv, window).forward(q, k, v, kv, md)
    else:
        reshape_and_cache(k, v, kv, md.slot_mapping)
        out = kernel.attend(q, kv, md, scale, window_sizes(window))
    ref = TorchSDPAImpl(hq, d, scale, hkv, window).forward(
        q.float(), k.float(), v.float(), ref_cache, dataclasses.replace(md, backend_cache={}))
    assert out.dtype == dtype and out.shape == q.shape
    # The new K/V went into the same slots in both caches.
    assert torch.equal(kv.float(), ref_cache)
    return _rel_err(out, ref)


def _mixed(max_ctx: int) -> tuple[list[int], list[int]]:
    """(query lens, seq lens): chunks over cached prefixes (prefix hits), fresh prefills,
    decodes from a 1-token context up to max_ctx."""
    reqs = [(37, 137), (1, 1), (64, 64), (1, max_ctx), (129, min(max_ctx, 3000) + 129),
            (1, 17), (5, 5), (200, 200 + max_ctx // 2), (1, BLOCK), (1, BLOCK + 1)]
    return [r[0] for r in reqs], [r[1] for r in reqs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv", [(8, 8), (8, 2), (32, 4)])  # GQA groups 1, 4, 8
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [None, 300])
def test_mixed_batch_matches_torch_sdpa(dtype, hq, hkv, d, window):
    q_lens, seq_lens = _mixed(8192)
    assert _flash_vs_sdpa(q_lens, seq_lens, hq, hkv, d, dtype, window) < TOL


def _probed_kernels():
    from pagedllm.attention.backends.flash_attn import _probe, candidates

    kernels = []
    for kernel in candidates():
        try:
            _probe(kernel, torch.device("cuda", torch.cuda.current_device()))
        except (RuntimeError, TypeError):
            continue
        kernels.append(kernel)
    return kernels


@pytest.mark.parametrize("window", [None, 300])
def test_every_working_kernel_here_matches_torch_sdpa(window):
    """Each implementation that passes the start-up probe here (the engine uses the first;
    the others are its fallbacks) on the mixed batch and on decodes."""
    kernels = _probed_kernels()
    assert kernels, "no FlashAttention kernel passed the probe"
    q_lens, seq_lens = _mixed(8192)
    for kernel in kernels:
        for case in ((q_lens, seq_lens, 32, 8, 128), ([1] * 3, [1, 4096, 8192], 8, 1, 64)):
            err = _flash_vs_sdpa(*case, torch.bfloat16, window, kernel=kernel)
            assert err < TOL, (kernel.label, case[:2], err)


@pytest.mark.parametrize("ctx", [1, 2, 255, 256, 257, 1000, 4096, 8192])
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (14, 2, 64), (8, 8, 64)])
def test_decode_only_matches_torch_sdpa(ctx, hq, hkv, d):
    seq_lens = [ctx, max(1, ctx // 2), 1, ctx]
    assert _flash_vs_sdpa([1] * 4, seq_lens, hq, hkv, d, torch.bfloat16, None) < TOL


@pytest.mark.parametrize("window", [None, 100])
def test_decode_with_window_and_long_prefill(window):
    assert _flash_vs_sdpa([1, 1, 1], [50, 1000, 8192], 16, 4, 128, torch.bfloat16,
                          window) < TOL
    assert _flash_vs_sdpa([8192], [8192], 8, 2, 128, torch.bfloat16, window) < TOL
    assert _flash_vs_sdpa([1500, 1], [8000, 7000], 8, 1, 64, torch.float16, window) < TOL


def test_decode_graph_replay_matches_eager():
    """A decode step captured once replays right for other lengths, tables and caches
    written into the same tensors (as StepGraphs does)."""
    from pagedllm.attention.backends.flash_attn import FlashAttentionImpl, select_kernel

    if not select_kernel(torch.cuda.current_device()).cuda_graphs:
        pytest.skip("this kernel does not capture in CUDA graphs (the engine runs eagerly)")
    hq, hkv, d, nb, width = 32, 8, 128, 24, 12
    impl = FlashAttentionImpl(hq, d, d**-0.5, hkv)
    static = _batch([1] * 4, [300, 5, 1024, 77], hq, hkv, d, torch.bfloat16, 1, nb, width)
    q, k, v, kv, md = static
    for _ in range(2):
        impl.forward(q, k, v, kv, dataclasses.replace(md, backend_cache={}))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = impl.forward(q, k, v, kv, dataclasses.replace(md, backend_cache={}))
    for seed, lens in ((2, [1000, 1, 2000, 256]), (3, [7, 1900, 3, 2900])):
        new = _batch([1] * 4, lens, hq, hkv, d, torch.bfloat16, seed, nb, width)
        expected = impl.forward(new[0], new[1], new[2], new[3].clone(), new[4])
        for dst, src in zip(static[:4], new[:4], strict=True):
            dst.copy_(src)
        for name in ("seq_lens", "block_table", "slot_mapping"):
            getattr(md, name).copy_(getattr(new[4], name))
        graph.replay()
        assert _rel_err(out, expected.float()) < 1e-3, lens


def test_engine_bf16_parity_with_hf_eager_and_graphs(tmp_path_factory):
    """Greedy bf16 through FLASH_ATTN (block size picked by the backend) against HF, as the Triton
    backend's test does: eagerly and with decode CUDA graphs."""
    from model_utils import make_tiny_model
    from test_gpu_engine import NEW_TOKENS, TINY, _hf, _prompts
    from transformers import AutoConfig

    from pagedllm import LLM, SamplingParams

    folder = make_tiny_model(tmp_path_factory.mktemp("llama_bf16"), "llama",
                             **{**TINY, "initializer_range": 0.3})
    prompts = _prompts(AutoConfig.from_pretrained(folder).vocab_size)
    expected = _hf(folder, prompts, torch.bfloat16)
    for enforce_eager in (True, False):
        llm = LLM(folder, device="cuda", gpu_memory_utilization=0.3, dtype="bfloat16",
                  enforce_eager=enforce_eager, attention_backend="FLASH_ATTN")
        runner = llm.engine.executor.runner
        assert runner.backend.name == "FLASH_ATTN" and runner.block_size == BLOCK
        assert (runner.graphs is not None) == (not enforce_eager
                                               and runner.backend.supports_cuda_graphs())
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                           ignore_eos=True), use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        matches = sum(g[:16] == e[:16] for g, e in zip(got, expected))
        assert matches >= 0.9 * len(prompts), (enforce_eager, matches, len(prompts))
        del llm, runner
        torch.cuda.empty_cache()


def test_engine_start_up_checks_on_cuda(tmp_path_factory):
    from model_utils import make_tiny_model

    from pagedllm import LLM

    folder = make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")
    with pytest.raises(ValueError, match="not float32; pass dtype='bfloat16'"):
        LLM(folder, device="cuda", dtype="float32", attention_backend="FLASH_ATTN")
    bad = 16 if BLOCK == 256 else 256
    with pytest.raises(ValueError, match=f"block_size={bad} is not supported by FLASH_ATTN"):
        LLM(folder, device="cuda", dtype="bfloat16", block_size=bad,
            attention_backend="FLASH_ATTN")


def test_start_up_names_the_kernel():
    from pagedllm.attention.backends.flash_attn import FlashAttentionBackend, select_kernel

    kernel = select_kernel(torch.cuda.current_device())
    assert FlashAttentionBackend.implementation().startswith(kernel.label)
    assert ("without CUDA graphs" in FlashAttentionBackend.implementation()) == (
        not kernel.cuda_graphs)
    assert ("FA2" in kernel.label or "FA3" in kernel.label) and (
        "PyTorch" in kernel.label or "package" in kernel.label)
    assert kernel.paged == (BLOCK == 256)
