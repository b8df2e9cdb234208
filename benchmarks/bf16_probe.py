"""Probe: how often bf16 greedy runs agree (first 16 tokens) on tiny random models, for
pagedllm vs HF bf16, and HF bf16 vs HF fp32 as a noise baseline.

    python benchmarks/bf16_probe.py                # dense llama shapes, three init ranges
    python benchmarks/bf16_probe.py --qwen3-moe    # the Qwen3-MoE shape of the GPU tests
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "gpu"))
import test_gpu_engine as t  # noqa: E402
import torch  # noqa: E402
from model_utils import make_tiny_model  # noqa: E402
from transformers import AutoConfig  # noqa: E402


def probe(arch: str, cfg: dict, label: str) -> None:
    folder = make_tiny_model(tempfile.mkdtemp(), arch, **cfg)
    prompts = t._prompts(AutoConfig.from_pretrained(folder).vocab_size)
    hf16 = t._hf(folder, prompts, torch.bfloat16)
    hf32 = t._hf(folder, prompts, torch.float32)
    ours = t._ours(folder, prompts, dtype="bfloat16", enforce_eager=False)
    m = lambda a, b: sum(x[:16] == y[:16] for x, y in zip(a, b))  # noqa: E731
    first = lambda a, b: sum(x[:1] == y[:1] for x, y in zip(a, b))  # noqa: E731
    print(f"{label}: ours~hf16 {m(ours, hf16)}/12  hf16~hf32 {m(hf16, hf32)}/12  "
          f"ours~hf32 {m(ours, hf32)}/12  (first token: ours~hf32 {first(ours, hf32)}/12, "
          f"hf16~hf32 {first(hf16, hf32)}/12)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--qwen3-moe", action="store_true")
    args = ap.parse_args()
    if args.qwen3_moe:
        import test_gpu_model_families as fam

        for init in (0.02, 0.1, 0.3):
            probe("qwen3_moe", dict(fam.QWEN3_MOE_SHAPE, initializer_range=init),
                  f"qwen3_moe init {init}")
        return
    for init in (0.1, 0.2, 0.3):
        for hidden in (128, 256):
            cfg = dict(t.TINY, initializer_range=init, hidden_size=hidden,
                       intermediate_size=2 * hidden)
            probe("llama", cfg, f"init {init} hidden {hidden}")


if __name__ == "__main__":
    main()
