"""Probe: how often bf16 greedy runs agree (first 16 tokens) on tiny random models, for
pagedllm vs HF bf16, and HF bf16 vs HF fp32 as a noise baseline."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "gpu"))
import test_gpu_engine as t  # noqa: E402
import torch  # noqa: E402
from model_utils import make_tiny_model  # noqa: E402

for init in (0.1, 0.2, 0.3):
    for hidden in (128, 256):
        cfg = dict(t.TINY, initializer_range=init, hidden_size=hidden, intermediate_size=2 * hidden)
        folder = make_tiny_model(tempfile.mkdtemp(), "llama", **cfg)
        from transformers import AutoConfig

        prompts = t._prompts(AutoConfig.from_pretrained(folder).vocab_size)
        hf16 = t._hf(folder, prompts, torch.bfloat16)
        hf32 = t._hf(folder, prompts, torch.float32)
        ours = t._ours(folder, prompts, dtype="bfloat16", enforce_eager=False)
        m = lambda a, b: sum(x[:16] == y[:16] for x, y in zip(a, b))  # noqa: E731
        print(f"init {init} hidden {hidden}: ours~hf16 {m(ours, hf16)}/12  "
              f"hf16~hf32 {m(hf16, hf32)}/12  ours~hf32 {m(ours, hf32)}/12", flush=True)
