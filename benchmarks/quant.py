"""Quantized serving against bf16 on one GPU, side by side in one call (issue 20):
Llama-3-8B shape, dummy weights quantized as a real load would quantize them.

Rows (each a fresh `benchmarks/throughput.py` process, pagedllm only):
  tput-bf16 / tput-fp8 / tput-fp8kv / tput-fp8-fp8kv: 1000 requests x 256 in / 256 out
    (output tok/s; the FP8 KV row: bf16 weights, FP8 cache, and its number of KV blocks;
    the last: FP8 weights and an FP8 cache, as FP8 deployments usually run);
  b1-bf16 / b1-fp8 / b1-awq: batch 1 (max_num_seqs 1), 32 in / 256 out: ms per output
    token (TPOT; the 32-token prefill adds under 1%).
Prints each row and the ratios the issue asks for:
  FP8 throughput >= 1.6x bf16; FP8 batch-1 TPOT <= 0.6x; FP8 KV: 2x blocks, throughput
  >= bf16 KV; W4A16 (AWQ format) batch-1 TPOT <= 0.4x.

  python benchmarks/quant.py --out /tmp/quant [--rows b1-bf16 b1-awq]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TPUT = ["--num-prompts", "1000", "--input-len", "256", "256", "--output-len", "256", "256"]
B1 = ["--num-prompts", "3", "--max-num-seqs", "1", "--input-len", "32", "32",
      "--output-len", "256", "256"]
ROWS = {  # the short batch-1 rows first
    "b1-bf16": B1,
    "b1-fp8": B1 + ["--quantization", "fp8"],
    "b1-awq": B1 + ["--quantization", "awq"],
    "tput-bf16": TPUT,
    "tput-fp8": TPUT + ["--quantization", "fp8"],
    "tput-fp8kv": TPUT + ["--kv-cache-dtype", "fp8"],
    "tput-fp8-fp8kv": TPUT + ["--quantization", "fp8", "--kv-cache-dtype", "fp8"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for each row's JSON and log")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per row")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "throughput.py")
    results: dict[str, dict] = {}
    for row in args.rows:
        path = os.path.join(args.out, f"quant_{row}.json")
        cmd = [sys.executable, script, "--preset", args.preset, "--device", "cuda",
               "--skip-hf", "--json", path, *ROWS[row]]
        with open(os.path.join(args.out, f"quant_{row}.log"), "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc == 0 and os.path.exists(path):
            r = json.load(open(path))["results"][0]
            results[row] = r
            print(f"{row:<12} {r['output_tok_s']:>10.1f} out tok/s  "
                  f"{r['ms_per_output_token']:>8.3f} ms/token  {r['num_kv_blocks']:>7} KV blocks",
                  flush=True)
        else:
            print(f"{row:<12} failed ({rc}); see quant_{row}.log", flush=True)

    def ratio(a: str, b: str, key: str) -> str:
        if a in results and b in results:
            return f"{results[a][key] / results[b][key]:.2f}x"
        return "n/a"

    summary = {
        "fp8 throughput / bf16 (>= 1.6)": ratio("tput-fp8", "tput-bf16", "output_tok_s"),
        "fp8 batch-1 TPOT / bf16 (<= 0.6)": ratio("b1-fp8", "b1-bf16", "ms_per_output_token"),
        "fp8 + fp8 KV throughput / bf16": ratio("tput-fp8-fp8kv", "tput-bf16", "output_tok_s"),
        "fp8 KV blocks / bf16 KV (2)": ratio("tput-fp8kv", "tput-bf16", "num_kv_blocks"),
        "fp8 KV throughput / bf16 KV (>= 1)": ratio("tput-fp8kv", "tput-bf16", "output_tok_s"),
        "W4A16 (awq) batch-1 TPOT / bf16 (<= 0.4)": ratio("b1-awq", "b1-bf16",
                                                         "ms_per_output_token"),
    }
    for k, v in summary.items():
        print(f"{k:<44} {v}")
    with open(os.path.join(args.out, "quant_summary.json"), "w") as f:
        json.dump(dict(rows=results, summary=summary), f, indent=1)


if __name__ == "__main__":
    main()
