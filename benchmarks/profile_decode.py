"""GPU kernel profile of steady-state decode steps (torch.profiler), kernels by total time.

Fills the engine with `--num-prompts` requests of `--input-len` tokens, runs until all are
decoding, then profiles `--steps` engine steps and prints the kernel table and the wall time
per step.

    python benchmarks/profile_decode.py --preset qwen2.5-0.5b --num-prompts 256 --input-len 600
    python benchmarks/profile_decode.py --preset llama-3-8b --num-prompts 1 --input-len 32 \
        --quantization fp8     # batch-1 decode of the FP8 model
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.phases import allocator_counts, allocator_delta
from pagedllm.benchmarks.presets import PRESET_QUANTIZATION, preset_folder

T = TypeVar("T")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=600)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--quantization", help="e.g. fp8 or awq (dummy weights quantized at load)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    ap.add_argument("--max-cudagraph-capture-size", type=int,
                    help="largest batch captured in a CUDA graph (default: the engine's)")
    ap.add_argument("--prefill-profile", action="store_true",
                    help="also profile the prefill steps that fill the engine (a second table)")
    ap.add_argument("--host-profile", action="store_true",
                    help="also print a cProfile of the host side of the profiled steps "
                    "(and of the prefill steps, without --prefill-profile)")
    args = ap.parse_args()

    checkpoint_quant = PRESET_QUANTIZATION.get(args.quantization)  # awq / gptq: in config.json
    llm = LLM(preset_folder(args.preset, quantization=checkpoint_quant), load_format="dummy",
              skip_tokenizer_init=True, enforce_eager=args.enforce_eager,
              max_model_len=args.input_len + 1024, max_num_seqs=max(args.num_prompts, 1),
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              **({} if args.max_cudagraph_capture_size is None else
                 {"max_cudagraph_capture_size": args.max_cudagraph_capture_size}))
    engine = llm.engine
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    for i in range(args.num_prompts):
        engine.add_request(str(i), {"prompt_token_ids": [rng.randrange(vocab)
                                                         for _ in range(args.input_len)]},
                           SamplingParams(temperature=args.temperature, max_tokens=1000,
                                          ignore_eos=True, detokenize=False))
    def fill() -> int:
        steps = 0
        while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or \
                engine.scheduler.waiting:
            engine.step()
            steps += 1
        return steps

    if args.prefill_profile:
        torch.cuda.synchronize()
        before = allocator_counts()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prefill_prof:
            steps = fill()
            torch.cuda.synchronize()
        print(f"prefill: {steps} steps for {args.num_prompts * args.input_len} prompt tokens "
              f"in {time.perf_counter() - start:.3f} s (profiled); allocator during them: "
              f"{allocator_delta(before)}")
        table = prefill_prof.key_averages()
        print(table.table(sort_by="cuda_time_total", row_limit=args.rows,
                          max_name_column_width=60))
        print("prefill steps by host (self CPU) time:")
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                          max_name_column_width=60))
    elif args.host_profile:  # the host side of the prefill steps
        before = allocator_counts()
        start = time.perf_counter()
        steps, stats = host_profiled(fill)
        print(f"prefill: {steps} steps in {time.perf_counter() - start:.3f} s (cProfile); "
              f"allocator during them: {allocator_delta(before)}")
        stats.sort_stats("tottime").print_stats(args.rows)
        stats.sort_stats("cumulative").print_stats(args.rows)
    else:
        fill()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    print(f"batch {len(engine.scheduler.running)}: {1e3 * per_step:.3f} ms per step "
          f"(unprofiled, {'eager' if args.enforce_eager else 'CUDA graphs'})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=60))
    if args.host_profile:
        _, stats = host_profiled(lambda: [engine.step() for _ in range(args.steps)])
        stats.sort_stats("tottime").print_stats(args.rows)


def host_profiled(run: Callable[[], T]) -> tuple[T, pstats.Stats]:
    """run() under cProfile, the device drained before the profile stops; its result and
    the host's stats."""
    host = cProfile.Profile()
    host.enable()
    result = run()
    torch.cuda.synchronize()
    host.disable()
    return result, pstats.Stats(host)


if __name__ == "__main__":
    main()
