"""`pagedllm bench serve|throughput`: the benchmark subcommands of the `pagedllm` CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

_SERVE_DESCRIPTION = """\
Benchmark a running OpenAI-compatible server (pagedllm, vLLM, llama.cpp, ...): stream a
workload of random prompts (or a JSONL file) at a Poisson request rate and/or a fixed
concurrency, then report request and token throughput, TTFT, TPOT, ITL and end-to-end
latency (mean, median, p99) and errors.
"""
_SERVE_EPILOG = """\
example:
  pagedllm bench serve --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \\
      --random-input-len 128 --random-output-len 64 --num-prompts 64 --max-concurrency 8 \\
      --ignore-eos --save-result --result-file c8.json
"""
_THROUGHPUT_DESCRIPTION = """\
Offline throughput of the engine (LLM.generate) against HF transformers `generate` on the
same random-token requests (every request makes exactly its output length).
"""


def register_bench(subparsers: argparse._SubParsersAction) -> None:
    """`pagedllm bench serve` and `pagedllm bench throughput`."""
    from pagedllm.benchmarks.serve import add_serve_args
    from pagedllm.benchmarks.throughput import add_throughput_args
    from pagedllm.entrypoints.cli import _HelpFormatter

    bench = subparsers.add_parser("bench", help="Benchmark a server or the engine.",
                                  description="Serving and offline benchmarks.",
                                  formatter_class=_HelpFormatter)
    sub = bench.add_subparsers(title="benchmarks", dest="bench_command", metavar="BENCHMARK")
    serve = sub.add_parser("serve", help="Online benchmark of an OpenAI-compatible server.",
                           description=_SERVE_DESCRIPTION, epilog=_SERVE_EPILOG,
                           formatter_class=_HelpFormatter)
    add_serve_args(serve)
    serve.set_defaults(func=_runner("serve", _run_serve))
    throughput = sub.add_parser("throughput", help="Offline engine throughput vs HF.",
                                description=_THROUGHPUT_DESCRIPTION,
                                formatter_class=_HelpFormatter)
    add_throughput_args(throughput)
    throughput.set_defaults(func=_runner("throughput", _run_throughput))
    bench.set_defaults(func=lambda args: _missing(bench))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _run_serve(args: argparse.Namespace) -> Any:
    from pagedllm.benchmarks.serve import run_bench_serve

    return run_bench_serve(args)


def _run_throughput(args: argparse.Namespace) -> Any:
    from pagedllm.benchmarks.throughput import run_bench_throughput

    return run_bench_throughput(args)


def _runner(name: str, run: Callable[[argparse.Namespace], Any]
            ) -> Callable[[argparse.Namespace], int]:
    """Wrap a benchmark: user errors (ValueError) print one line and exit with 2."""

    def call(args: argparse.Namespace) -> int:
        try:
            run(args)
        except ValueError as e:
            print(f"pagedllm bench {name}: error: {e}", file=sys.stderr)
            return 2
        return 0

    return call
