"""The `pagedllm` command line: `pagedllm serve [MODEL] [flags]` (more subcommands to come).

A subcommand is one `register_*(subparsers)` function below that adds its parser and sets
`func` (called with the parsed args, returns the exit code). To add one (e.g. `generate`,
`bench`), write its module with such a function and list it in `_subcommands()`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

_EXAMPLES = """\
examples:
  pagedllm serve Qwen/Qwen2.5-1.5B-Instruct --port 8000
  pagedllm serve ./my-model --max-model-len 4096 --api-key secret
  pagedllm serve --host 0.0.0.0     # expose the default model on all interfaces
  curl http://localhost:8000/v1/models
  pagedllm bench serve --base-url http://localhost:8000 --num-prompts 32 --max-concurrency 8
  pagedllm bench throughput --preset smollm2-135m --num-prompts 32

Run 'pagedllm COMMAND --help' for the flags of a command.
"""

_SERVE_DESCRIPTION = """\
Start the OpenAI-compatible HTTP server for MODEL (a hub id, a local folder or a .gguf
file; the engine's default model when left out).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/embeddings (pooling models: served automatically when the model's runner
resolves to "pooling", e.g. with --runner pooling), POST /tokenize, POST /detokenize,
GET /health, GET /version, GET /stats (engine scheduler and KV-cache counters),
GET /metrics (Prometheus) and GET /dashboard (a live page of queues, KV blocks and
throughput).
The server listens on 127.0.0.1 by default, so only this machine can reach it; pass
--host 0.0.0.0 to expose it (and set --api-key).
SIGINT (Ctrl-C) or SIGTERM shuts it down cleanly.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends meaningful defaults to flag help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (action.option_strings and "%(default)" not in help_text
                and default is not None and default is not False
                and default is not argparse.SUPPRESS
                and not isinstance(action, argparse._HelpAction)):
            help_text += " (default: %(default)s)"
        return help_text


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    """`pagedllm serve [MODEL]`: the OpenAI-compatible server."""
    from pagedllm.entrypoints.openai.api_server import make_arg_parser

    parser = subparsers.add_parser(
        "serve",
        help="Start the OpenAI-compatible HTTP server.",
        description=_SERVE_DESCRIPTION,
        formatter_class=_HelpFormatter,
        epilog="example: pagedllm serve Qwen/Qwen2.5-1.5B-Instruct --port 8000",
    )
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="Model to serve (same as --model).")
    make_arg_parser(parser)
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            print(f"pagedllm serve: error: MODEL {args.model_tag!r} and --model "
                  f"{args.model!r} disagree; give one.", file=sys.stderr)
            return 2
        args.model = args.model_tag
    return run_server(args)


def _subcommands() -> tuple[Registrar, ...]:
    """Every subcommand's registrar, in the order `pagedllm --help` lists them."""
    from pagedllm.benchmarks.cli import register_bench

    return (register_serve, register_bench)


def _version() -> str:
    from pagedllm.entrypoints.openai.api_server import server_version

    return server_version()


def build_parser() -> argparse.ArgumentParser:
    """The `pagedllm` parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="pagedllm",
        description="pagedllm: a high-throughput LLM inference and serving engine with an "
                    "OpenAI-compatible server.",
        formatter_class=_HelpFormatter,
        epilog=_EXAMPLES,
    )
    parser.add_argument("-V", "--version", action="version",
                        version=f"pagedllm {_version()}", help="Print the version and exit.")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for register in _subcommands():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedllm` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
