"""Offline throughput: pagedllm vs HF transformers `generate` on the same model and requests
(the same as `pagedllm bench throughput`; the code lives in pagedllm.benchmarks.throughput).

Requests are random token ids with input/output lengths drawn uniformly from ranges; every
request generates exactly its output length (ignore_eos). Prints output tokens/s for each
engine and their ratio.

  python benchmarks/throughput.py --preset smollm2-135m --num-prompts 64 \
      --input-len 32 256 --output-len 32 256 --device cpu
  python benchmarks/throughput.py --preset qwen2.5-0.5b --num-prompts 256 \
      --input-len 100 1024 --output-len 100 1024 --device cuda --hf-num-prompts 64
  python benchmarks/throughput.py --preset llama-3-8b --num-prompts 1000 \
      --input-len 256 256 --output-len 256 256 --tensor-parallel-size 2 --skip-hf
"""

from __future__ import annotations

import argparse

from pagedllm.benchmarks.throughput import add_throughput_args, run_bench_throughput


def main() -> None:
    ap = add_throughput_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = ap.parse_args()
    try:
        run_bench_throughput(args)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
