"""CPU serving peers on the default model: pagedllm serve vs llama.cpp's llama-server vs
HF transformers (benchmarks/hf_server.py), same client and prompts, ratios printed.

Each server is started alone, timed to its first healthy answer (start-up) and measured for
resident memory (the sum over its process tree) after the runs. The workload: streamed
/v1/completions of 50-200 random English words in and 64-128 tokens out (ignore_eos),
greedy, at 1, 8 and 32 concurrent clients (3, 3 and 2 requests per client by default), then
`pagedllm bench serve --random-input-len 128 --random-output-len 64` at 8 clients.
llama-server is not built by this script: pass the path of one built as
../shared/MODELS.md describes (benchmarks only).

  python benchmarks/cpu_serving.py --llama-server /tmp/llama.cpp/build/bin/llama-server \
      --servers pagedllm,llama,hf --json /tmp/cpu_serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

WORDS = ("the a of and to in is was it for on that with as by at from this be are have "
         "an or which one all were when we there can more if no out so said what up its "
         "about into than them only other new some could time these two may then do first "
         "any my now such like our over man me even most made after also did many before "
         "must through back years where much your way well down should because each just "
         "those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take "
         "three house light water city river garden morning evening story letter music "
         "mountain window table village market winter summer ship road bridge forest").split()
MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class RunResult:
    clients: int
    requests: int
    out_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    dropped: int = 0

    def summary(self) -> dict[str, float]:
        return {
            "clients": self.clients, "requests": self.requests,
            "out_tok_s": round(self.out_tokens / self.seconds, 1),
            "ttft_p50_ms": round(1000 * statistics.median(self.ttft), 1) if self.ttft else -1,
            "tpot_mean_ms": round(1000 * statistics.mean(self.tpot), 1) if self.tpot else -1,
            "dropped": self.dropped,
        }


def make_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """(prompt of 50-200 words, max_tokens 64-128), the same for every server."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(50, 200))]
        out.append((" ".join(words).capitalize() + ".", rng.randint(64, 128)))
    return out


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                      result: RunResult) -> None:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {"2": -100}}  # EOS, for servers without ignore_eos
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.dropped += 1
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError):
        result.dropped += 1
        return
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or chunks
    if first is None or tokens < max_tokens * 0.9:
        result.dropped += 1
    result.out_tokens += tokens
    if first is not None:
        result.ttft.append(first - start)
        if tokens > 1:
            result.tpot.append((end - first) / (tokens - 1))


async def run_load(url: str, clients: int, prompts: list[tuple[str, int]]) -> RunResult:
    result = RunResult(clients, len(prompts), 0, 0.0)
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt, max_tokens = queue.get_nowait()
            await one_request(client, url, prompt, max_tokens, result)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        await one_request(client, url, "Hello there, how are you today?", 8,
                          RunResult(1, 1, 0, 0.0))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        result.seconds = time.perf_counter() - start
    return result


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return total / 1024


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not become ready")


def server_command(name: str, args: argparse.Namespace, gguf: str, port: int) -> list[str]:
    threads = str(args.threads)
    if name == "pagedllm":
        return [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
                "--disable-uvicorn-access-log", "--disable-log-stats", *args.pagedllm_args]
    if name == "llama":
        return [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                "-t", threads, "-np", "32", "-c", "32768", "--no-webui", "-a", MODEL_NAME]
    return [sys.executable, str(Path(__file__).parent / "hf_server.py"), "--model", gguf,
            "--served-model-name", MODEL_NAME, "--port", str(port), "--max-batch-size", "32",
            "--threads", threads]


def bench_serve(url: str) -> dict[str, Any]:
    """`pagedllm bench serve` with the issue's random workload at 8 clients ({"error": ...}
    when it fails against this server)."""
    out = f"/tmp/cpu_serving_bench_{os.getpid()}.json"
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve", "--base-url", url,
           "--model", MODEL_NAME, "--tokenizer", MODEL_NAME, "--dataset-name", "random",
           "--random-input-len", "128", "--random-output-len", "64", "--ignore-eos",
           "--extra-body", '{"logit_bias": {"2": -100}}', "--seed", "0", "--num-warmups", "2",
           "--max-concurrency", "8", "--num-prompts", "24", "--save-result", "--result-file", out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # a peer that drops requests: say so, measure the others
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"bench serve exited {done.returncode}: {' | '.join(tail)}"}
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    keys = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "completed")
    return {k: round(data[k], 1) if isinstance(data.get(k), float) else data.get(k)
            for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="pagedllm,llama,hf")
    ap.add_argument("--llama-server", default=None, help="path of a built llama-server")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests-per-client", default="3,3,2",
                    help="requests each client sends, per entry of --clients")
    ap.add_argument("--threads", type=int, default=2, help="threads of llama.cpp and HF")
    ap.add_argument("--pagedllm-args", nargs="*", default=[])
    ap.add_argument("--port", type=int, default=8190)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bench-serve", action="store_true")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    from pagedllm.models.loader.default_model import find_default_model

    gguf = find_default_model()
    clients = [int(c) for c in args.clients.split(",")]
    per_client = [int(c) for c in args.requests_per_client.split(",")]
    if len(per_client) != len(clients):
        ap.error("--requests-per-client needs one entry per --clients entry")
    results: dict[str, dict] = {}
    for name in args.servers.split(","):
        if name == "llama" and not args.llama_server:
            print("skipping llama: no --llama-server", file=sys.stderr)
            continue
        port = args.port
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, LD_LIBRARY_PATH=str(Path(args.llama_server or ".").parent))
        proc = subprocess.Popen(server_command(name, args, gguf, port), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            entry: dict = {"startup_s": round(wait_ready(url, proc), 2),
                           "rss_ready_mb": round(tree_rss_mb(proc.pid))}
            runs = []
            for c, per in zip(clients, per_client):
                prompts = make_prompts(c * per, args.seed + c)
                r = asyncio.run(run_load(url, c, prompts)).summary()
                runs.append(r)
                print(name, r, f"load {os.getloadavg()[0]:.1f}", flush=True)
            entry["runs"] = runs
            if not args.no_bench_serve:
                entry["bench_serve_c8"] = bench_serve(url)
                print(name, "bench serve", entry["bench_serve_c8"], flush=True)
            entry["rss_after_mb"] = round(tree_rss_mb(proc.pid))
            entry["load_avg"] = round(os.getloadavg()[0], 2)
            results[name] = entry
            print(name, {k: v for k, v in entry.items() if k != "runs"}, flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if "pagedllm" in results:
        base = results["pagedllm"]["runs"]
        for peer in ("llama", "hf"):
            if peer in results:
                ratios = [round(a["out_tok_s"] / b["out_tok_s"], 2)
                          for a, b in zip(base, results[peer]["runs"])]
                print(f"pagedllm / {peer} out tok/s at {clients} clients: {ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
