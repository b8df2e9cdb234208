"""Paired CPU serving comparison that holds on a noisy machine: the servers run side by
side (idle ones cost nothing) and take turns, one load round each, A B C A B C ..., and
the ratio of each round's out tok/s to the same turn's peer is printed with its median.

Servers: `pagedllm` (the engine core on a thread, the CPU default), `pagedllm-proc`
(PAGEDLLM_ENABLE_MULTIPROCESSING=1: the core in its own process), `pagedllm@TREE` (pagedllm
imported from the source tree TREE, e.g. an older commit's `git archive`, for before / after
pairs) and `llama` (llama.cpp's llama-server, built as ../shared/MODELS.md describes;
benchmarks only). The workload and
client are benchmarks/cpu_serving.py's (streamed completions, 50-200 words in, 64-128
tokens out, greedy, ignore_eos).

  python benchmarks/cpu_paired.py --llama-server /tmp/llama.cpp/build/bin/llama-server \
      --servers pagedllm,pagedllm-proc,llama --clients 1 --rounds 6 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cpu_serving import make_prompts, run_load, tree_rss_mb, wait_ready  # noqa: E402


def command(name: str, args: argparse.Namespace, gguf: str, port: int) -> list[str]:
    if name.startswith("pagedllm"):
        threads = args.pagedllm_threads or str(args.threads)
        return [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
                "--disable-uvicorn-access-log", "--disable-log-stats"] + (
                    [] if threads == "auto" else ["--cpu-threads", threads])
    return [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-np", "32", "-c", "32768", "--no-webui",
            "-a", "SmolLM2-135M-Instruct"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="pagedllm,pagedllm-proc,llama")
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pagedllm-threads", default=None,
                    help="pagedllm's --cpu-threads (default: --threads); 'auto' leaves it to "
                         "the engine (tuned between 1 and all cores)")
    ap.add_argument("--port", type=int, default=8390)
    args = ap.parse_args()
    from pagedllm.models.loader.default_model import find_default_model

    gguf = find_default_model()
    names = args.servers.split(",")
    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    try:
        for i, name in enumerate(names):
            env = dict(os.environ)
            if name == "llama":
                env["LD_LIBRARY_PATH"] = str(Path(args.llama_server).parent)
            if name == "pagedllm-proc":
                env["PAGEDLLM_ENABLE_MULTIPROCESSING"] = "1"
            tree = name.split("@", 1)[1] if name.startswith("pagedllm@") else None
            port = args.port + i
            procs[name] = subprocess.Popen(command(name, args, gguf, port), env=env, cwd=tree,
                                           stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            urls[name] = f"http://127.0.0.1:{port}"
            print(name, "ready in", round(wait_ready(urls[name], procs[name]), 2), "s",
                  flush=True)
        rates: dict[str, list[float]] = {n: [] for n in names}
        tpots: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            prompts = make_prompts(args.clients * args.requests_per_client, 1000 + r)
            for name in names:
                res = asyncio.run(run_load(urls[name], args.clients, prompts)).summary()
                rates[name].append(res["out_tok_s"])
                tpots[name].append(res["tpot_mean_ms"])
                print(f"round {r} {name}: {res} load {os.getloadavg()[0]:.1f}", flush=True)
        for name in names:
            print(f"{name}: out tok/s median {statistics.median(rates[name]):.1f} "
                  f"(min {min(rates[name]):.1f}, max {max(rates[name]):.1f}), TPOT median "
                  f"{statistics.median(tpots[name]):.1f} ms, RSS {tree_rss_mb(procs[name].pid):.0f}"
                  " MiB")
        base = names[0]
        for peer in names[1:]:
            ratios = [a / b for a, b in zip(rates[base], rates[peer])]
            print(f"{base} / {peer} per round: {[round(x, 2) for x in ratios]}, median "
                  f"{statistics.median(ratios):.2f}")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
