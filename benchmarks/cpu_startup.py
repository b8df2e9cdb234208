"""Start-up and memory of `pagedllm serve` (default model), two source trees taking turns:
seconds from launch to the first 200 from /health, the server's own "Ready in" line, and
resident memory summed over the server's processes at ready and after a few requests.

  python benchmarks/cpu_startup.py --tree new=. --tree old=/path/to/other/checkout --runs 5

Each tree's server runs with PYTHONPATH set to the tree (its pagedllm is imported). The
runs alternate (new, old, new, old, ...), so drift in the machine's load hits both alike;
medians and the per-pair ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MiB summed over `pid` and its descendants."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    rss = uss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        uss += info.uss
    return rss / 2**20, uss / 2**20


def one_start(tree: str, port: int, requests: int, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    log = tempfile.NamedTemporaryFile(prefix="pagedllm-startup-", suffix=".log", delete=False)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve",
                             "--port", str(port), "--disable-uvicorn-access-log", *extra],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=os.path.abspath(tree))
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        ready = time.perf_counter() - start
        rss_ready, uss_ready = tree_memory_mb(proc.pid)
        for i in range(requests):
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300, json={
                "prompt": "The history of the river city " * (20 + 10 * i), "max_tokens": 64,
                "temperature": 0, "ignore_eos": True})
        rss_after, uss_after = tree_memory_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    with open(log.name) as f:
        text = f.read()
    os.unlink(log.name)
    line = re.search(r"Ready in .*", text)
    return {"ready_s": ready, "rss_ready": rss_ready, "uss_ready": uss_ready,
            "rss_after": rss_after, "uss_after": uss_after,
            "line": line[0] if line else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=4,
                    help="completions sent after ready, before the second memory reading")
    ap.add_argument("--port", type=int, default=8470)
    ap.add_argument("--serve-args", nargs="*", default=[])
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for run in range(args.runs):
        for name, path in trees.items():
            r = one_start(path, args.port, args.requests, args.serve_args)
            results[name].append(r)
            print(f"run {run} {name}: ready {r['ready_s']:.2f} s, RSS ready "
                  f"{r['rss_ready']:.0f} / after {r['rss_after']:.0f} MiB (USS "
                  f"{r['uss_after']:.0f}), load {os.getloadavg()[0]:.1f}", flush=True)
            if r["line"]:
                print("   ", r["line"], flush=True)
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("ready_s", "rss_ready", "rss_after", "uss_after")}
        print(f"{name}: ready median {med['ready_s']:.2f} s (min "
              f"{min(r['ready_s'] for r in rs):.2f}), RSS median ready {med['rss_ready']:.0f}"
              f" / after {med['rss_after']:.0f} MiB, USS after {med['uss_after']:.0f} MiB")
    names = list(trees)
    for peer in names[1:]:
        ratios = [a["ready_s"] / b["ready_s"] for a, b in zip(results[names[0]], results[peer])]
        print(f"ready {names[0]} / {peer} per pair: {[round(x, 2) for x in ratios]}, median "
              f"{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
