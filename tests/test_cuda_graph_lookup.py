"""Which captured CUDA graph a step runs from (worker/cuda_graphs.py), checked on the CPU:
the lookup is plain bookkeeping over the step's metadata; capture and replay are GPU tests
(tests/gpu/test_gpu_engine.py)."""

from __future__ import annotations

import torch

from pagedllm.attention.backends.abstract import AttentionMetadata
from pagedllm.worker.cuda_graphs import MIXED, StepGraphs, mixed_capture_sizes


def _md(query_lens: list[int], cols: int = 4) -> AttentionMetadata:
    qsl = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    n = len(query_lens)
    return AttentionMetadata(
        num_actual_tokens=int(qsl[-1]), num_reqs=n, max_query_len=max(query_lens),
        max_seq_len=64, query_start_loc=qsl, seq_lens=torch.full((n,), 64, dtype=torch.int32),
        block_table=torch.zeros(n, cols, dtype=torch.int32),
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long), query_start_loc_cpu=qsl,
        seq_lens_cpu=torch.full((n,), 64, dtype=torch.int32),
        is_decode_only=all(q == 1 for q in query_lens))


def _graphs(**kwargs) -> StepGraphs:
    return StepGraphs(None, [], torch.device("cpu"), **{
        "max_batch_size": 16, "max_blocks_per_seq": 8, **kwargs})


def test_mixed_capture_sizes_ladder() -> None:
    assert mixed_capture_sizes(512) == [32, 64, 128, 256, 384, 512]
    assert mixed_capture_sizes(1000) == [32, 64, 128, 256, 384, 512, 768, 1000]
    assert mixed_capture_sizes(16) == [16]
    for cap in (100, 2048, 8192):
        sizes = mixed_capture_sizes(cap)
        assert sizes == sorted(set(sizes)) and sizes[-1] == cap
        assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:]))  # padding at most doubles


def test_mixed_steps_pad_to_the_next_token_count() -> None:
    graphs = _graphs(max_mixed_tokens=512, max_num_reqs=64)
    assert graphs.lookup(_md([1] * 10)) == (16, 1)  # decodes: the decode ladder
    assert graphs.lookup(_md([1] * 10 + [100])) == (128, MIXED)
    assert graphs.lookup(_md([300, 1, 1])) == (384, MIXED)
    assert graphs.lookup(_md([512])) == (512, MIXED)
    assert graphs.lookup(_md([513])) is None  # past the largest: eager
    assert graphs.lookup(_md([40] * 2, cols=9)) is None  # a longer block table than captured
    assert graphs.lookup(_md([1] * 40 + [20])) == (64, MIXED)
    assert graphs.lookup(_md([1] * 65 + [5])) is None  # more requests than captured


def test_no_mixed_graphs_when_off_or_speculating() -> None:
    assert _graphs().lookup(_md([1, 30])) is None
    spec = _graphs(max_mixed_tokens=512, max_num_reqs=64, verify_query_lens=(2, 3))
    assert spec.mixed_sizes == []
    assert spec.lookup(_md([3, 3])) == (2, 3)  # verify steps keep their exact graphs
    assert spec.lookup(_md([3, 30])) is None
