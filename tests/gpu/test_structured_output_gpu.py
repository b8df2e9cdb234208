"""The grammar bitmask on a CUDA device: the pinned host rows copied asynchronously and applied
to bf16 / fp32 logits give the CPU result; the xgrammar (Triton) and torch paths agree."""

from __future__ import annotations

import pytest
import torch

from pagedllm.structured_output import GrammarBitmask, apply_token_bitmask
from pagedllm.structured_output import config as so_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xgrammar", [True, False])
def test_bitmask_on_cuda_matches_cpu(monkeypatch, dtype, xgrammar):
    if xgrammar:
        pytest.importorskip("xgrammar")
    else:
        monkeypatch.setitem(so_config._PACKAGES, "xgrammar", "xgrammar_not_installed")
    rows, vocab = 64, 32_000 + 5  # a vocab that is not a multiple of 32
    gen = torch.Generator().manual_seed(0)
    bitmask = GrammarBitmask(rows, vocab, "cuda")
    assert bitmask.host.is_pinned()
    bitmask.host.copy_(torch.randint(-2**31, 2**31 - 1, bitmask.host.shape, generator=gen,
                                     dtype=torch.int32))
    used = list(range(0, rows, 3))
    logits = torch.randn(rows, vocab + 11, generator=gen).to(dtype)  # padded logits
    expected = logits.clone()
    apply_token_bitmask(expected, bitmask.host.clone(), used)
    on_device = logits.cuda()
    bitmask.apply(on_device, used)
    bitmask.wait_copied()  # the host rows may be refilled now
    bitmask.host.fill_(0)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), expected)
    untouched = [r for r in range(rows) if r not in used]
    assert torch.equal(on_device.cpu()[untouched], logits[untouched])
