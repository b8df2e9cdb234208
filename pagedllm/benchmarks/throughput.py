"""Offline throughput: pagedllm vs HF transformers `generate` on the same model and requests
(`pagedllm bench throughput`, also `benchmarks/throughput.py`).

Requests are random token ids with input/output lengths drawn uniformly from ranges; every
request generates exactly its output length (ignore_eos). Prints output tokens/s for each
engine and their ratio.

  pagedllm bench throughput --preset smollm2-135m --num-prompts 64 \
      --input-len 32 256 --output-len 32 256 --device cpu
  pagedllm bench throughput --preset qwen2.5-0.5b --num-prompts 256 \
      --input-len 100 1024 --output-len 100 1024 --device cuda --hf-num-prompts 64
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from typing import Any

import torch

from pagedllm.benchmarks.phases import instrument
from pagedllm.benchmarks.phases import report as phase_report
from pagedllm.benchmarks.presets import PRESET_QUANTIZATION, PRESETS, preset_folder

Requests = list[tuple[list[int], int]]  # (prompt token ids, output length)


def make_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  vocab: int, seed: int) -> Requests:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab - 100) for _ in range(rng.randint(*input_len))],
             rng.randint(*output_len)) for _ in range(n)]


def run_pagedllm(model: str, requests: Requests, args: argparse.Namespace) -> dict:
    from pagedllm import LLM, SamplingParams

    kwargs = dict(device=args.device, dtype=args.dtype, enforce_eager=args.enforce_eager,
                  max_model_len=args.max_model_len,
                  skip_tokenizer_init=not args.structured_fraction,
                  load_format="dummy" if args.preset else "auto", disable_log_stats=True)
    if args.structured_fraction:
        kwargs["tokenizer"] = args.tokenizer
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.attention_backend:
        kwargs["attention_backend"] = args.attention_backend
    if args.max_cudagraph_capture_size:
        kwargs["max_cudagraph_capture_size"] = args.max_cudagraph_capture_size
    if args.quantization:
        kwargs["quantization"] = args.quantization
    if args.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = args.kv_cache_dtype
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
    constrained = _constrain(params, args.structured_fraction)
    # Warm-up (compilation, allocator) on a couple of requests; with constrained requests
    # also the grammar backend's token table (built once per engine), not the schemas.
    warm = [SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False) for _ in range(2)]
    if constrained:
        from pagedllm import StructuredOutputsParams

        warm[1].structured_outputs = StructuredOutputsParams(choice=["warm-up"])
    llm.generate(prompts[:2], warm, use_tqdm=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    phase_times = instrument(llm) if args.phase_times else None
    outs, elapsed = _timed_generate(llm, prompts, params, args.device)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if not constrained and out_tokens != sum(o for _, o in requests):
        raise RuntimeError("a request stopped before its output length despite ignore_eos")
    in_tokens = sum(len(p) for p, _ in requests)
    num_blocks = llm.engine.num_blocks  # the core in this process or its own
    if phase_times is not None:
        print(phase_report(phase_times))
    matched = _matched_unconstrained(llm, prompts, outs, args) if constrained else {}
    if constrained:
        matched["new_schema_first_token_s"] = _new_schema_first_token(llm, prompts[0], args)
    del llm, outs
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return dict(engine="pagedllm", tensor_parallel_size=args.tensor_parallel_size,
                requests=len(requests), constrained_requests=constrained,
                output_tokens=out_tokens,
                input_tokens=in_tokens, seconds=elapsed, startup_s=startup,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                num_kv_blocks=num_blocks, ms_per_output_token=1000 * elapsed / out_tokens,
                output_tok_s=out_tokens / elapsed, total_tok_s=(out_tokens + in_tokens) / elapsed,
                **matched)


def _timed_generate(llm: Any, prompts: list[dict], params: list[Any],
                    device: str) -> tuple[list[Any], float]:
    """`llm.generate` and its wall time, the device drained at the end."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return outs, time.perf_counter() - start


def _new_schema_first_token(llm: Any, prompt: dict, args: argparse.Namespace) -> float:
    """Seconds to the first token of one request held to a schema never seen before (its
    compile included), the engine otherwise idle."""
    from pagedllm import SamplingParams, StructuredOutputsParams

    schema = {"type": "object", "properties": {f"field_{time.time_ns()}": {"type": "integer"}},
              "required": []}
    params = SamplingParams(max_tokens=1, detokenize=False,
                            structured_outputs=StructuredOutputsParams(json=schema))
    return _timed_generate(llm, [prompt], [params], args.device)[1]


def _matched_unconstrained(llm: Any, prompts: list[dict], outs: list[Any],
                           args: argparse.Namespace) -> dict:
    """The same requests again on the same engine, unconstrained, each generating exactly as
    many tokens as it did under its grammar: the grammar's own cost, apart from the shorter
    outputs (constrained requests end when their grammar does, so new requests join a
    running batch all along instead of in waves). The prefix cache is emptied first: the
    prompts' blocks from the first run would otherwise spare this one its prefills."""
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, detokenize=False,
                             max_tokens=max(len(o.outputs[0].token_ids), 1)) for o in outs]
    if not llm.reset_prefix_cache():
        raise RuntimeError("the prefix cache could not be emptied (requests still running)")
    again, elapsed = _timed_generate(llm, prompts, params, args.device)
    tokens = sum(len(o.outputs[0].token_ids) for o in again)
    return dict(matched_unconstrained_seconds=elapsed,
                matched_unconstrained_output_tok_s=tokens / elapsed)


def _constrain(params: list[Any], fraction: float) -> int:
    """Hold every request of a `fraction` (spread evenly) to one of 8 JSON schemas, in turn;
    a grammar that ends stops its request early. Returns how many are constrained."""
    if not fraction:
        return 0
    from pagedllm import StructuredOutputsParams
    from pagedllm.benchmarks.json_schemas import JSON_SCHEMAS

    schemas = list(JSON_SCHEMAS.values())[:8]
    picked = [i for i in range(len(params)) if int((i + 1) * fraction) > int(i * fraction)]
    for k, i in enumerate(picked):
        params[i].structured_outputs = StructuredOutputsParams(json=schemas[k % len(schemas)])
    return len(picked)


def run_hf(model: str, requests: Requests, args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.float32 if args.device == "cpu" else torch.bfloat16}[args.dtype]
    if args.preset:
        config = AutoConfig.from_pretrained(model)
        with torch.device(args.device):  # random init on the device: fast for 8B
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    hf = hf.to(args.device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    requests = requests[: args.hf_num_prompts] if args.hf_num_prompts else requests
    batch = args.hf_batch_size or len(requests)
    # Sorting by length reduces padding, as a fair user of HF would do.
    order = sorted(requests, key=lambda r: len(r[0]))
    out_tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(order), batch):
            chunk = order[i:i + batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, (p, _) in enumerate(chunk):  # left padding
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            new = max(o for _, o in chunk)
            hf.generate(ids.to(args.device), attention_mask=mask.to(args.device),
                        max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0)
            out_tokens += sum(o for _, o in chunk)  # tokens the requests asked for
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del hf
    return dict(engine="hf_transformers", requests=len(requests), output_tokens=out_tokens,
                seconds=elapsed, output_tok_s=out_tokens / elapsed, batch_size=batch)


def add_throughput_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `pagedllm bench throughput`."""
    ap.add_argument("--model", help="model folder / hub id (else --preset with dummy weights)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="real model shape with random weights (default: smollm2-135m)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-cudagraph-capture-size", type=int, default=None)
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="shard pagedllm's model over N GPUs (or CPU processes)")
    ap.add_argument("--distributed-executor-backend", default="mp", choices=["mp", "ray"])
    ap.add_argument("--phase-times", action="store_true",
                    help="print pagedllm's wall time per engine phase (ms per step)")
    ap.add_argument("--hf-num-prompts", type=int, default=None,
                    help="run HF on the first N requests only (same requests)")
    ap.add_argument("--hf-batch-size", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--structured-fraction", type=float, default=0.0,
                    help="share of requests held to one of 8 JSON schemas (needs --tokenizer)")
    ap.add_argument("--tokenizer", help="tokenizer folder (for --structured-fraction with a "
                                        "preset's dummy weights)")
    ap.add_argument("--quantization", default=None,
                    choices=["fp8", "awq", "gptq", "compressed-tensors"],
                    help="fp8: quantize at load; awq / gptq with --preset: random 4-bit "
                         "weights in that checkpoint format (group 128)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--json", help="write results to this file")
    return ap


def validate_throughput_args(args: argparse.Namespace) -> None:
    """Raise ValueError for flags that cannot make a run."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}.")
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            raise ValueError(f"--{name.replace('_', '-')} MIN MAX needs 1 <= MIN <= MAX, "
                             f"got {lo} {hi}.")
    if args.model and args.preset:
        raise ValueError("give --model or --preset, not both.")
    if not 0.0 <= args.structured_fraction <= 1.0:
        raise ValueError(f"--structured-fraction must be in [0, 1], got "
                         f"{args.structured_fraction}.")
    if args.structured_fraction and not args.tokenizer and args.preset:
        raise ValueError("--structured-fraction with --preset needs --tokenizer DIR (the "
                         "grammars are built over a real tokenizer's vocabulary).")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}.")
    for name in ("hf_num_prompts", "hf_batch_size", "max_num_seqs", "max_num_batched_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def run_bench_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run pagedllm (and HF unless --skip-hf) on the same requests; print and return results."""
    validate_throughput_args(args)
    if not args.model and not args.preset:
        args.preset = "smollm2-135m"
    model = args.model or preset_folder(args.preset,
                                        quantization=PRESET_QUANTIZATION.get(args.quantization))
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
    if "matched_unconstrained_output_tok_s" in results[0]:
        r = results[0]
        print(f"same requests unconstrained, same output lengths: "
              f"{r['matched_unconstrained_output_tok_s']:.1f} out tok/s; constrained / that: "
              f"{r['output_tok_s'] / r['matched_unconstrained_output_tok_s']:.2f}x; first token "
              f"for a schema never seen before: {1e3 * r['new_schema_first_token_s']:.0f} ms")
    if len(results) == 2:
        print(f"ratio pagedllm / HF (output tokens/s): "
              f"{results[0]['output_tok_s'] / results[1]['output_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    return results
