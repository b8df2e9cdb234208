"""`pagedllm bench serve`: an online serving benchmark against any OpenAI-compatible server.

Requests stream (SSE) from /v1/completions or /v1/chat/completions, sent at a Poisson request
rate (all at once by default) and/or under a concurrency cap. Reported: request and token
throughput, time to first token (TTFT), time per output token after the first (TPOT),
inter-token latency between streamed chunks (ITL) and end-to-end latency (mean, median,
p99), and errors. Output tokens come from the server's usage when it streams one, else from
the tokenizer on the generated text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from pagedllm.benchmarks.datasets import (
    SampleRequest,
    get_tokenizer,
    jsonl_requests,
    random_requests,
)

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_ERRORS_KEPT = 10


@dataclass
class RequestResult:
    """What the client saw of one request (seconds)."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    usage_tokens: int | None = None  # completion_tokens from the server's usage, if sent
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


# ------------------------------------------------------------------------------- arguments
def _parse(value: str, cast: type, valid: Callable[[Any], bool], what: str) -> Any:
    """argparse type: `cast(value)` that must satisfy `valid`, else a message with `what`."""
    try:
        parsed = cast(value)
    except ValueError:
        parsed = None
    if parsed is None or not valid(parsed):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return parsed


def _positive_int(value: str) -> int:
    return _parse(value, int, lambda n: n >= 1, "a positive integer")


def _rate(value: str) -> float:
    return _parse(value, float, lambda r: r > 0, "requests per second: a number > 0 or inf")


def _ratio(value: str) -> float:
    return _parse(value, float, lambda r: 0.0 <= r < 1.0, "a range ratio in [0, 1)")


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `pagedllm bench serve` (vLLM's `bench serve` spelling where it exists)."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="Server root (with or without /v1).")
    g.add_argument("--model", default=None,
                   help="Model name sent in requests (default: the first of /v1/models).")
    g.add_argument("--endpoint", default="completions",
                   choices=["completions", "chat", *ENDPOINTS.values()],
                   help="completions (/v1/completions) or chat (/v1/chat/completions).")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="Bearer key (default: $OPENAI_API_KEY).")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="Seconds one request may take before it counts as failed.")
    d = parser.add_argument_group("workload")
    d.add_argument("--dataset-name", default="random", choices=["random", "jsonl"],
                   help="random token prompts, or a JSONL file (--dataset-path).")
    d.add_argument("--dataset-path", default=None,
                   help='JSONL file: one JSON string or {"prompt": ..., "output_len": N} '
                        "per line.")
    d.add_argument("--num-prompts", type=_positive_int, default=100,
                   help="Number of requests to send.")
    d.add_argument("--random-input-len", type=_positive_int, default=256,
                   help="Prompt length in tokens (random dataset).")
    d.add_argument("--random-output-len", type=_positive_int, default=128,
                   help="Tokens to generate per request (default for JSONL rows too).")
    d.add_argument("--random-range-ratio", type=_ratio, default=0.0,
                   help="Lengths are uniform in [len * (1 - r), len * (1 + r)].")
    d.add_argument("--tokenizer", default=None,
                   help="Tokenizer for prompts and token counts: folder, hub id or .gguf "
                        "(default: --model; pagedllm's default model name works too).")
    d.add_argument("--trust-remote-code", action="store_true")
    d.add_argument("--seed", type=int, default=0, help="Seed of prompts and arrival times.")
    d.add_argument("--ignore-eos", action="store_true",
                   help="Send ignore_eos so that each request makes its full output length "
                        "(vLLM and pagedllm extension; other servers may ignore it).")
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--extra-body", type=json.loads, default=None,
                   help='JSON merged into every request body, e.g. \'{"top_k": 1}\'.')
    t = parser.add_argument_group("load")
    t.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="Requests per second, Poisson arrivals (inf: all at once).")
    t.add_argument("--max-concurrency", type=_positive_int, default=None,
                   help="Most requests in flight at once (default: no cap).")
    t.add_argument("--num-warmups", type=int, default=0,
                   help="Requests sent (and not counted) before the measured run.")
    o = parser.add_argument_group("output")
    o.add_argument("--label", default=None, help="Name of this run in the result.")
    o.add_argument("--save-result", action="store_true", help="Write the result as JSON.")
    o.add_argument("--result-file", default=None,
                   help="Where --save-result writes (default: "
                        "bench-serve-<label>-<date>.json in the current folder).")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Cross-flag checks argparse cannot do; raises ValueError saying what to change."""
    if args.dataset_name == "jsonl" and not args.dataset_path:
        raise ValueError("--dataset-name jsonl needs --dataset-path FILE.")
    if args.dataset_path and args.dataset_name != "jsonl":
        raise ValueError("--dataset-path is only used with --dataset-name jsonl.")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}.")
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}.")
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got "
                         f"{args.base_url!r}.")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object.")


def api_root(base_url: str) -> str:
    """`http://h:p/v1/` or `http://h:p` -> `http://h:p`."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


# ------------------------------------------------------------------------------- requests
def build_payload(args: argparse.Namespace, model: str, req: SampleRequest,
                  output_len: int | None = None) -> dict[str, Any]:
    """The JSON body of one streamed request."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": output_len or req.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if _endpoint_kind(args.endpoint) == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.extra_body:
        body.update(args.extra_body)
    return body


def _endpoint_kind(endpoint: str) -> str:
    return "chat" if endpoint in ("chat", ENDPOINTS["chat"]) else "completions"


def _chunk_text(chunk: dict[str, Any], kind: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if kind == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def _sse_lines(content: Any) -> AsyncIterator[bytes]:
    """The lines of a streamed body, whatever their length (aiohttp's own line iterator
    refuses lines past its buffer, and a chunk with many logprobs can be long)."""
    pending = b""
    async for data in content.iter_any():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line
    if pending:
        yield pending


async def send_request(session: Any, url: str, body: dict[str, Any], headers: dict[str, str],
                       kind: str, prompt_len: int) -> RequestResult:
    """Stream one request; never raises (failures are in the result)."""
    import aiohttp

    result = RequestResult(prompt_len=prompt_len)
    parts: list[str] = []
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.read()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status}: {text[:300]}"
                return result
            async for raw in _sse_lines(resp.content):
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    return result
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    result.usage_tokens = int(usage["completion_tokens"])
                text = _chunk_text(chunk, kind)
                if text:
                    now = time.perf_counter()
                    if not parts:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    parts.append(text)
        result.latency = time.perf_counter() - start
        result.text = "".join(parts)
        result.success = True
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"[:300]
    return result


async def _arrivals(n: int, rate: float, rng: random.Random):
    """Yield 0..n-1, sleeping exponential gaps (Poisson process) when the rate is finite."""
    for i in range(n):
        yield i
        if math.isfinite(rate) and i < n - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def run_requests(args: argparse.Namespace, model: str, requests: list[SampleRequest]
                       ) -> tuple[list[RequestResult], float]:
    """Send the warm-ups, then every request at the rate / concurrency asked for; returns
    the results (in request order) and the measured run's duration.

    The client is aiohttp: per streamed chunk it costs about a quarter of httpx's CPU, and
    a saturated client would measure itself rather than the server (benchmarks/RESULTS.md,
    issue 14)."""
    import aiohttp

    kind = _endpoint_kind(args.endpoint)
    url = api_root(args.base_url) + ENDPOINTS[kind]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=30.0)
    connector = aiohttp.TCPConnector(limit=0)  # as many connections as requests in flight
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     read_bufsize=1 << 16) as session:
        for i in range(args.num_warmups):
            req = requests[i % len(requests)]
            warm = await send_request(session, url, build_payload(args, model, req, 8),
                                      headers, kind, req.prompt_len)
            if not warm.success:
                raise ValueError(f"warm-up request failed: {warm.error}")
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(req: SampleRequest) -> RequestResult:
            body = build_payload(args, model, req)
            if semaphore is None:
                return await send_request(session, url, body, headers, kind, req.prompt_len)
            async with semaphore:
                return await send_request(session, url, body, headers, kind, req.prompt_len)

        rng = random.Random(args.seed)
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(requests[i]))
                 async for i in _arrivals(len(requests), args.request_rate, rng)]
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


# ------------------------------------------------------------------------------- metrics
def _summary(values: list[float], name: str, out: dict[str, Any]) -> None:
    """mean / median / p99 of `values` (seconds) into out as milliseconds."""
    arr = np.asarray(values, dtype=float) * 1000.0 if values else np.zeros(1)
    out[f"mean_{name}_ms"] = float(arr.mean())
    out[f"median_{name}_ms"] = float(np.median(arr))
    out[f"p99_{name}_ms"] = float(np.percentile(arr, 99))


def count_output_tokens(result: RequestResult, tokenizer: Any | None) -> int:
    """The server's completion_tokens when given, else the tokenizer's count of the text,
    else the number of streamed chunks."""
    if result.usage_tokens is not None:
        return result.usage_tokens
    if tokenizer is not None:
        return len(tokenizer.encode(result.text, add_special_tokens=False))
    return len(result.itl) + (1 if result.text else 0)


def compute_metrics(results: list[RequestResult], duration: float,
                    tokenizer: Any | None) -> dict[str, Any]:
    """Aggregate the per-request results of one run (times in ms, rates per second)."""
    ok = [r for r in results if r.success]
    for r in ok:
        r.output_tokens = count_output_tokens(r, tokenizer)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = [r.error for r in results if not r.success]
    m: dict[str, Any] = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:MAX_ERRORS_KEPT],
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "output_tokens_from_usage": sum(r.usage_tokens is not None for r in ok),
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    _summary([r.ttft for r in ok], "ttft", m)
    _summary(tpots, "tpot", m)
    _summary([x for r in ok for x in r.itl], "itl", m)
    _summary([r.latency for r in ok], "e2el", m)
    return m


def format_report(m: dict[str, Any], label: str) -> str:
    """A human-readable table of the metrics."""
    rows = [
        ("Successful requests", f"{m['completed']}"),
        ("Failed requests", f"{m['failed']}"),
        ("Benchmark duration (s)", f"{m['duration_s']:.2f}"),
        ("Total input tokens", f"{m['total_input_tokens']}"),
        ("Total generated tokens", f"{m['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
    ]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token "
                       "(excl. 1st token)"), ("itl", "Inter-token Latency"),
                       ("e2el", "End-to-end Latency")):
        rows.append((f"-- {title}", ""))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {key.upper()} (ms)", f"{m[f'{stat}_{key}_ms']:.2f}"))
    width = 52
    lines = [f"{' Serving Benchmark Result: ' + label + ' ':=^{width}}"]
    lines += [f"{k:<40}{v:>12}" if v else f"{k:-<{width}}" for k, v in rows]
    lines += [f"First errors: {e}" for e in m["errors"][:3]]
    lines.append("=" * width)
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main
def _discover_model(args: argparse.Namespace) -> str:
    """--model, else the first model the server lists; ValueError if it cannot be reached."""
    import urllib.error
    import urllib.request

    url = api_root(args.base_url) + "/v1/models"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=30) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"cannot reach the server at {args.base_url} ({e}); is it "
                         "running?") from e
    if args.model:
        return args.model
    text = body.decode("utf-8", "replace")
    if status != 200:
        raise ValueError(f"GET {url} answered {status}: {text[:200]}; pass "
                         "--model (and --api-key if the server needs one).")
    data = json.loads(text).get("data") or []
    if not data:
        raise ValueError(f"GET {url} lists no model; pass --model.")
    return str(data[0]["id"])


def load_requests(args: argparse.Namespace, tokenizer: Any) -> list[SampleRequest]:
    if args.dataset_name == "jsonl":
        return jsonl_requests(args.dataset_path, args.num_prompts, args.random_output_len,
                              tokenizer, args.seed)
    return random_requests(tokenizer, args.num_prompts, args.random_input_len,
                           args.random_output_len, args.random_range_ratio, args.seed)


def run_bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed flags; returns the result dict."""
    validate_args(args)
    model = _discover_model(args)
    tokenizer = get_tokenizer(args.tokenizer or model, args.trust_remote_code)
    requests = load_requests(args, tokenizer)
    results, duration = asyncio.run(run_requests(args, model, requests))
    metrics = compute_metrics(results, duration, tokenizer)
    label = args.label or f"{_endpoint_kind(args.endpoint)}"
    result = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "label": label,
        "base_url": args.base_url,
        "model": model,
        "endpoint": ENDPOINTS[_endpoint_kind(args.endpoint)],
        "dataset_name": args.dataset_name,
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        **metrics,
    }
    print(format_report(metrics, label))
    if args.save_result:
        path = args.result_file or (
            f"bench-serve-{label}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"Result written to {path}", file=sys.stderr)
    return result
