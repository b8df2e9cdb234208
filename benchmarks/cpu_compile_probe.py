"""torch.compile (inductor C++) against eager for one decoder layer's non-attention work at
batch 1 on the CPU (default model, packed): post-attention norm, MLP, the next layer's input
norm and qkv projection. Prints microseconds per call (eager, compiled, twice each), the
compile time and the largest difference.

  PAGEDLLM_CPU_THREADS=1 python benchmarks/cpu_compile_probe.py
"""

from __future__ import annotations

import time

import torch

from pagedllm import LLM


def main() -> None:
    llm = LLM(device="cpu", max_model_len=1024)
    model = llm.engine.core.executor.runner.model
    layer, after = model.layers[3], model.layers[4]

    def block(hidden: torch.Tensor, residual: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        hidden, residual = after.input_layernorm(layer.mlp(hidden), residual)
        return after.self_attn.qkv_proj(hidden), residual

    dtype = llm.engine.core.config.model.dtype  # the activations' dtype (bf16 here)
    h = torch.randn(1, model.config.hidden_size, dtype=dtype)
    r = torch.randn(1, model.config.hidden_size, dtype=dtype)

    def bench(fn, n: int = 300) -> float:
        for _ in range(20):
            fn(h, r)
        start = time.perf_counter()
        for _ in range(n):
            fn(h, r)
        return (time.perf_counter() - start) / n * 1e6

    with torch.inference_mode():
        eager1 = bench(block)
        start = time.perf_counter()
        compiled = torch.compile(block, dynamic=False)
        compiled(h, r)
        compile_s = time.perf_counter() - start
        comp1, eager2, comp2 = bench(compiled), bench(block), bench(compiled)
        diff = (block(h, r)[0].float() - compiled(h, r)[0].float()).abs().max().item()
    print(f"eager {eager1:.0f}/{eager2:.0f} us, compiled {comp1:.0f}/{comp2:.0f} us, "
          f"compile {compile_s:.1f} s, max diff {diff:.4f}")


if __name__ == "__main__":
    main()
