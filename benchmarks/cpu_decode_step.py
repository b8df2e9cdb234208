"""One engine step on the CPU at batch B (default model, packed unless a dtype is given):
ms per step (wall and process CPU time) over --steps decode steps after --warmup more, then
a torch.profiler table of 5 more (op counts too with --counts; none with --no-profile).

  PAGEDLLM_CPU_THREADS=1 python benchmarks/cpu_decode_step.py 8 [--dtype float32] [--counts]
  PAGEDLLM_CPU_THREADS=2 python benchmarks/cpu_decode_step.py 1 --steps 100 --warmup 10 --no-profile
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("batch", type=int)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--input-len", type=int, default=150)
    ap.add_argument("--counts", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    kwargs = {"device": "cpu", "max_model_len": 1024}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    engine = LLM(**kwargs).engine
    rng = random.Random(0)
    for i in range(args.batch):
        ids = [rng.randrange(1000, 40000) for _ in range(args.input_len)]
        engine.add_request(str(i), {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
    sched = engine.scheduler
    while sched.waiting or any(r.num_output_tokens == 0 for r in sched.running):
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    steps = args.steps
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - start) / steps
    cpu_dt = (time.process_time() - cpu) / steps
    print(f"batch {args.batch}: {dt * 1e3:.2f} ms/step ({cpu_dt * 1e3:.2f} ms CPU), "
          f"{args.batch / dt:.1f} tok/s, threads {torch.get_num_threads()}")
    if args.no_profile:
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.counts:
        print(prof.key_averages().table(sort_by="count", row_limit=40))


if __name__ == "__main__":
    main()
