"""Offline `LLM.generate` with the engine core in this process against the core in its own
process (PAGEDLLM_ENABLE_MULTIPROCESSING=0 / 1), on the same requests, alternating A B A B
so that a drifting machine moves both. Prints each run and the median ratio.

  python benchmarks/offline_core_process.py --model DEFAULT --device cpu --num-prompts 32 \
      --input-len 64 128 --output-len 64 64 --rounds 3
  python benchmarks/offline_core_process.py --preset qwen2.5-0.5b --device cuda \
      --num-prompts 256 --input-len 100 1024 --output-len 100 1024 --rounds 2

`--model DEFAULT` is the embedded default model (SmolLM2-135M-Instruct GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from pagedllm.benchmarks.presets import preset_folder
from pagedllm.benchmarks.throughput import (
    add_throughput_args,
    make_requests,
    run_pagedllm,
    validate_throughput_args,
)
from pagedllm.entrypoints.llm import MULTIPROCESSING_ENV


def main() -> None:
    ap = add_throughput_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    args.skip_hf = True
    if args.model == "DEFAULT":
        from pagedllm.models.loader.gguf_loader import find_default_model

        args.model = str(find_default_model())
    validate_throughput_args(args)
    if not args.model and not args.preset:
        args.preset = "smollm2-135m"
    model = args.model or preset_folder(args.preset)
    from transformers import AutoConfig

    try:
        vocab = AutoConfig.from_pretrained(model).vocab_size
    except (OSError, ValueError):  # a GGUF file
        from pagedllm.models.loader.gguf_loader import load_gguf_tokenizer

        vocab = len(load_gguf_tokenizer(model))
    if args.max_model_len is None:
        args.max_model_len = args.input_len[1] + args.output_len[1] + 8
    requests = make_requests(args.num_prompts, tuple(args.input_len), tuple(args.output_len),
                             vocab, args.seed)
    runs: dict[str, list[float]] = {"in-process": [], "core process": []}
    for r in range(args.rounds):
        for mode, value in (("in-process", "0"), ("core process", "1")):
            os.environ[MULTIPROCESSING_ENV] = value
            result = run_pagedllm(model, requests, args)
            runs[mode].append(result["output_tok_s"])
            print(f"round {r + 1} {mode:>12}: {result['output_tok_s']:8.1f} out tok/s "
                  f"({result['seconds']:.2f} s, start-up {result['startup_s']:.1f} s)",
                  flush=True)
    ratios = [b / a for a, b in zip(runs["in-process"], runs["core process"])]
    summary = {mode: statistics.median(v) for mode, v in runs.items()}
    print(f"median out tok/s: in-process {summary['in-process']:.1f}, core process "
          f"{summary['core process']:.1f}; core process / in-process "
          f"{statistics.median(ratios):.3f} (per round {', '.join(f'{x:.3f}' for x in ratios)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratios": ratios, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
