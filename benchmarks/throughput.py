"""Offline throughput: pagedllm vs HF transformers `generate` on the same model and requests
(also `pagedllm bench throughput`; the shared parts live in pagedllm.benchmarks.throughput).

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
import gc
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from presets import preset_folder  # noqa: E402

from pagedllm.benchmarks.throughput import make_requests, run_hf  # noqa: E402


def run_pagedllm(model: str, requests, args) -> dict:
    from pagedllm import LLM, SamplingParams

    kwargs = dict(device=args.device, dtype=args.dtype, enforce_eager=args.enforce_eager,
                  max_model_len=args.max_model_len, skip_tokenizer_init=True,
                  load_format="dummy" if args.preset else "auto", disable_log_stats=True)
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.attention_backend:
        kwargs["attention_backend"] = args.attention_backend
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
        kwargs["distributed_executor_backend"] = args.distributed_executor_backend
    start = time.perf_counter()
    llm = LLM(model, **kwargs)
    startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=o, ignore_eos=True,
                             detokenize=False) for _, o in requests]
    # Warm-up (compilation, allocator) on a couple of requests.
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True,
                                              detokenize=False)] * 2, use_tqdm=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    totals = None
    if args.phase_times:
        from phases import instrument
        totals = instrument(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert out_tokens == sum(o for _, o in requests), "every request must produce its length"
    in_tokens = sum(len(p) for p, _ in requests)
    if totals is not None:
        from phases import report
        print(report(totals))
    del llm, outs
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return dict(engine="pagedllm", tensor_parallel_size=args.tensor_parallel_size,
                requests=len(requests), output_tokens=out_tokens,
                input_tokens=in_tokens, seconds=elapsed, startup_s=startup,
                output_tok_s=out_tokens / elapsed, total_tok_s=(out_tokens + in_tokens) / elapsed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder / hub id (else --preset with dummy weights)")
    ap.add_argument("--preset", default=None, help="smollm2-135m, qwen2.5-0.5b, llama-3-8b...")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="shard pagedllm's model over this many GPUs (HF runs on one; "
                         "use --skip-hf)")
    ap.add_argument("--distributed-executor-backend", default="mp", choices=["mp", "ray"])
    ap.add_argument("--hf-num-prompts", type=int, default=None,
                    help="run HF on the first N requests only (same requests)")
    ap.add_argument("--hf-batch-size", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--phase-times", action="store_true",
                    help="print pagedllm's wall time per engine phase (ms per step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write results to this file")
    args = ap.parse_args()
    if not args.model and not args.preset:
        args.preset = "smollm2-135m"
    model = args.model or preset_folder(args.preset)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    if args.max_model_len is None:
        args.max_model_len = args.input_len[1] + args.output_len[1] + 8
    requests = make_requests(args.num_prompts, tuple(args.input_len), tuple(args.output_len),
                             vocab, args.seed)
    # pagedllm first, in a fresh process (run_pagedllm frees its KV cache and graphs on
    # return): run after HF's generate in the same process, it measured up to 40% slower.
    results = [run_pagedllm(model, requests, args)]
    if not args.skip_hf:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        results.append(run_hf(model, requests, args))
    for r in results:
        print(json.dumps(r))
    print(f"\n{'engine':<18}{'requests':>9}{'out tokens':>12}{'seconds':>10}{'out tok/s':>12}")
    for r in results:
        print(f"{r['engine']:<18}{r['requests']:>9}{r['output_tokens']:>12}"
              f"{r['seconds']:>10.2f}{r['output_tok_s']:>12.1f}")
    if len(results) == 2:
        print(f"ratio pagedllm / HF (output tokens/s): "
              f"{results[0]['output_tok_s'] / results[1]['output_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
