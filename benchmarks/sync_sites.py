"""Where the host waits for the GPU: run a benchmark script under torch's CUDA sync debug mode
and print each synchronizing call site (the Python stack above it) with how often it fired.

A hidden synchronization in the step loop (a pageable copy, `.item()`, `.tolist()`) makes
the host wait for the forward it just launched, so that its own work no longer overlaps the
device. Expected sites (the engine's one wait per step on the step's event) do not show:
event waits are not reported by the debug mode.

  python benchmarks/sync_sites.py benchmarks/throughput.py --preset llama-3-8b --device cuda \
      --num-prompts 256 --input-len 256 256 --output-len 128 128 --skip-hf \
      --structured-fraction 0.5 --tokenizer TOKENIZER_DIR
"""

from __future__ import annotations

import atexit
import runpy
import sys
import traceback
import warnings
from collections import Counter


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    import torch

    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return
        stack = traceback.extract_stack()[:-2]
        frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in stack
                  if "/warnings.py" not in f.filename][-6:]
        sites[" <- ".join(reversed(frames))] += 1

    def report() -> None:
        print(f"\n{sum(sites.values())} synchronizing calls at {len(sites)} sites:")
        for site, count in sites.most_common(25):
            print(f"{count:8d}  {site}")

    warnings.showwarning = record
    warnings.simplefilter("always")
    atexit.register(report)
    torch.cuda.set_sync_debug_mode("warn")
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
