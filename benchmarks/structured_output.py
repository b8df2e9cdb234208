"""Structured-output backends head to head: grammar compile time and per-step mask time.

For each backend (xgrammar, guidance) with the SmolLM2 tokenizer (or --tokenizer DIR):
- the one-off token-table build of the backend;
- the compile time of every schema in pagedllm.benchmarks.json_schemas (each compiled cold);
- at batch --batch, requests cycling through the schemas, each first advanced
  --advance tokens into its output: the time to fill the batch's bitmask on the host (one
  parallel call per backend, as the manager does), to apply it to the logits (xgrammar's
  kernel where installed) and to accept the sampled tokens; medians over --steps steps, and
  the first fill of the fresh grammars alone.

    python benchmarks/structured_output.py --batch 256 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedllm.benchmarks.json_schemas import JSON_SCHEMAS
from pagedllm.structured_output import (
    StructuredOutputManager,
    StructuredOutputsConfig,
    StructuredOutputsParams,
)
from pagedllm.structured_output.config import backend_available


def load_tokenizer(path: str | None):
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from pagedllm.models.loader.gguf_loader import find_default_model, load_gguf_tokenizer

    return load_gguf_tokenizer(find_default_model())


def bench_backend(name: str, tokenizer, args) -> dict[str, float]:
    manager = StructuredOutputManager(tokenizer, config=StructuredOutputsConfig(backend=name),
                                      max_rows=args.batch, device=args.device)
    t0 = time.perf_counter()
    backend = manager._backend(name)  # the token table, built once per engine
    table_s = time.perf_counter() - t0
    compile_ms = []
    params = [StructuredOutputsParams(json=s) for s in JSON_SCHEMAS.values()]
    for p in params:
        t0 = time.perf_counter()
        backend.compile(p)
        compile_ms.append((time.perf_counter() - t0) * 1e3)

    # backend= skips the choice of backend: xgrammar also runs the schema it would pass on.
    requests = [manager.grammar_init(params[i % len(params)], backend=name)
                for i in range(args.batch)]
    for r in requests:
        r.wait(600)
    gen = torch.Generator().manual_seed(0)
    vocab = manager.vocab_size

    def step(timings: dict[str, list[float]] | None) -> None:
        active = [(r, i) for i, r in enumerate(requests) if not r.is_terminated()]
        t0 = time.perf_counter()
        rows = manager.fill_bitmask(active)
        t1 = time.perf_counter()
        logits = torch.randn(len(requests), vocab, generator=gen).to(args.device)
        if args.device != "cpu":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        manager.apply_bitmask(logits, rows)
        if args.device != "cpu":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        sampled = logits.argmax(-1).tolist()
        t3b = time.perf_counter()
        for r, i in active:
            if not r.accept_tokens([sampled[i]]):
                raise AssertionError(f"{name}: masked token rejected")
        t4 = time.perf_counter()
        if timings is not None:
            timings["fill"].append((t1 - t0) * 1e3)
            timings["apply"].append((t3 - t2) * 1e3)
            timings["accept"].append((t4 - t3b) * 1e3)

    first: dict[str, list[float]] = {"fill": [], "apply": [], "accept": []}
    step(first)  # the first masks of fresh grammars (llguidance builds its lexer lazily)
    for _ in range(args.advance - 1):
        step(None)
    timings: dict[str, list[float]] = {"fill": [], "apply": [], "accept": []}
    for _ in range(args.steps):
        step(timings)
    manager.shutdown()
    return {
        "table_s": table_s,
        "compile_total_ms": sum(compile_ms),
        "compile_median_ms": statistics.median(compile_ms),
        "compile_max_ms": max(compile_ms),
        "first_fill_ms": first["fill"][0],
        **{f"{k}_ms": statistics.median(v) for k, v in timings.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--advance", type=int, default=5, help="tokens into the output first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None, help="an HF tokenizer folder (default SmolLM2)")
    p.add_argument("--backends", nargs="+", default=["xgrammar", "guidance"])
    args = p.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"{len(JSON_SCHEMAS)} schemas, vocab {len(tokenizer)}, batch {args.batch}, "
          f"{args.steps} steps after {args.advance}, device {args.device}, "
          f"{torch.get_num_threads()} torch threads")
    print("| backend | token table s | compile total ms | median | max | first fill ms | "
          "fill ms/step | apply ms/step | accept ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.backends:
        if not backend_available(name):
            print(f"| {name} | not installed | | | | | | | |")
            continue
        r = bench_backend(name, tokenizer, args)
        print(f"| {name} | {r['table_s']:.2f} | {r['compile_total_ms']:.1f} | "
              f"{r['compile_median_ms']:.2f} | {r['compile_max_ms']:.1f} | "
              f"{r['first_fill_ms']:.1f} | {r['fill_ms']:.2f} | "
              f"{r['apply_ms']:.2f} | {r['accept_ms']:.2f} |")


if __name__ == "__main__":
    main()
