"""Engine overhead per step without the model: how much host time one engine step costs.

The model's forward pass is replaced by a no-op that returns zeros and the LM head by random
logits over a small vocabulary, so what is left is the scheduler, the KV cache bookkeeping,
input preparation, the sampler call and the output processing: the host work that a GPU
step has to hide or wait for. Run with `--profile` to see where it goes.

    python benchmarks/step_overhead.py --num-prompts 256 --input-len 100 1024 --output-len 100 1024
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.phases import instrument, report
from pagedllm.utils import steady_gc


def tiny_folder(vocab: int) -> str:
    import json
    import os
    import tempfile

    folder = tempfile.mkdtemp(prefix="pagedllm-overhead-")
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, vocab_size=vocab,
                  rms_norm_eps=1e-5, torch_dtype="float32")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def stub_model(llm: LLM, vocab: int) -> None:
    """Replace the forward pass and LM head with cheap stand-ins of the right shapes."""
    model = llm.engine.executor.runner.model

    def forward(input_ids, positions, kv_caches, md):
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(hidden):
        return torch.randn(hidden.shape[0], vocab)

    model.forward = forward
    model.compute_logits = compute_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=(100, 1024))
    p.add_argument("--output-len", type=int, nargs=2, default=(100, 1024))
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="the step's token budget (default: the engine's CPU default; the "
                   "H200's offline default is 16384)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    rng = random.Random(0)
    reqs = [(rng.randint(*args.input_len), rng.randint(*args.output_len))
            for _ in range(args.num_prompts)]
    max_len = max(i + o for i, o in reqs)
    llm = LLM(tiny_folder(args.vocab), device="cpu", load_format="dummy",
              skip_tokenizer_init=True, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              num_gpu_blocks_override=sum((i + o) // 16 + 2 for i, o in reqs),
              **({} if args.max_num_batched_tokens is None else
                 {"max_num_batched_tokens": args.max_num_batched_tokens}))
    stub_model(llm, args.vocab)
    prompts = [{"prompt_token_ids": [rng.randrange(args.vocab) for _ in range(i)]}
               for i, _ in reqs]
    params = [SamplingParams(temperature=1.0, max_tokens=o, ignore_eos=True, detokenize=False)
              for _, o in reqs]
    engine = llm.engine
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, sp)

    times = instrument(llm)
    profiler = cProfile.Profile() if args.profile else None
    steps = 0
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    with steady_gc():  # as LLM.generate runs its step loop
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - start
    out_tokens = sum(o for _, o in reqs)
    print(f"{steps} steps in {elapsed:.2f} s: {1e3 * elapsed / steps:.2f} ms per step, "
          f"{out_tokens / elapsed:.0f} output tok/s ceiling from host work alone")
    print(report(times))
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
