"""Batch-1 decode latency (TPOT) of a preset against its bandwidth floor.

The floor is the bytes one decode step must read (every active parameter: attention, norms,
router, the top-k experts' weights, the LM head; plus the KV cache at the mean context)
divided by the measured device-to-device copy bandwidth (bytes read + written per second: the
memory traffic the card sustains). TPOT is timed as (time of 1 + N output tokens - time of
1 output token) / N for one request of --input-len tokens, dummy weights, greedy.

    python benchmarks/moe_decode.py --preset qwen3-30b-a3b [--output-len 256] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_decode import copy_bandwidth  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.benchmarks.presets import PRESETS, preset_folder  # noqa: E402


def active_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters one token reads: experts scaled by top_k / num_experts, the
    input embedding counted as one row (unless tied to the LM head)."""
    from pagedllm.models.layers.fused_moe import FusedMoE

    total = 0
    expert_params = {}
    for module in model.modules():
        if isinstance(module, FusedMoE):
            for p in (module.w13_weight, module.w2_weight):
                expert_params[id(p)] = module.top_k / module.num_experts
    tied = getattr(model, "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("embed_tokens") and not tied:
            nbytes = p.shape[1] * p.element_size()
        total += int(nbytes * expert_params.get(id(p), 1.0))
    return total


def timed_generate(llm: LLM, prompt: list[int], max_tokens: int, reps: int = 3) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N decode steps: the kernels' GPU time per step")
    args = ap.parse_args()
    llm = LLM(preset_folder(args.preset), device="cuda", dtype="bfloat16", load_format="dummy",
              skip_tokenizer_init=True, max_num_seqs=8, max_model_len=4096,
              enforce_eager=args.enforce_eager, disable_log_stats=True)
    model = llm.engine.executor.runner.model
    prompt = [(i * 7919) % 1000 + 10 for i in range(args.input_len)]
    timed_generate(llm, prompt, 8, reps=1)  # warm up
    t1 = timed_generate(llm, prompt, 1)
    tn = timed_generate(llm, prompt, 1 + args.output_len)
    tpot_ms = (tn - t1) / args.output_len * 1e3
    weights = active_bytes(model)
    elem = torch.tensor([], dtype=torch.bfloat16).element_size()
    specs = model.kv_cache_specs()
    mean_ctx = args.input_len + args.output_len / 2
    kv = int(mean_ctx * sum(s.bytes_per_token(elem) for s in specs))
    copy_gbs = copy_bandwidth()
    floor_ms = (weights + kv) / (copy_gbs * 1e9) * 1e3
    result = dict(preset=args.preset, device=torch.cuda.get_device_name(),
                  input_len=args.input_len, output_len=args.output_len,
                  cuda_graphs=not args.enforce_eager, tpot_ms=tpot_ms,
                  active_weight_gb=weights / 1e9, kv_gb=kv / 1e9,
                  copy_gbs_read_plus_write=copy_gbs, floor_ms=floor_ms,
                  ratio_to_floor=tpot_ms / floor_ms)
    print(f"{args.preset} batch 1, {args.input_len} in / {args.output_len} out: TPOT "
          f"{tpot_ms:.2f} ms; floor {floor_ms:.2f} ms ({weights / 1e9:.2f} GB active weights "
          f"+ {kv / 1e9:.3f} GB KV at {copy_gbs:.0f} GB/s); {tpot_ms / floor_ms:.2f}x")
    if args.profile:
        result["profile"] = profile_decode(llm, prompt, args.profile, tpot_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def profile_decode(llm: LLM, prompt: list[int], steps: int, tpot_ms: float) -> dict:
    """GPU time per decode step by kernel (torch.profiler over one request of 1 + steps
    tokens; the prefill's kernels are a small share). Prints the top kernels and how much of
    TPOT the kernels fill: the rest is gaps between them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_generate(llm, prompt, 1 + steps, reps=1)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append((us / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    busy_ms = sum(us for us, _, _ in rows) / 1e3
    print(f"kernels: {busy_ms:.2f} ms of GPU time per step against TPOT {tpot_ms:.2f} ms "
          f"({len(rows)} kernel names; {sum(c for _, c, _ in rows):.0f} launches per step)")
    for us, count, name in rows[:25]:
        print(f"  {us:8.1f} us/step  {count:6.1f}x  {name[:90]}")
    return dict(kernel_ms_per_step=busy_ms, launches_per_step=sum(c for _, c, _ in rows),
                top=[dict(us_per_step=us, count_per_step=c, name=n) for us, c, n in rows[:40]])


if __name__ == "__main__":
    main()
