"""Speculative decoding: one client, speculation vs none; prints speed-ups and acceptance.

CPU (default): the real default model (SmolLM2-135M GGUF) on a copy-heavy chat workload
("repeat / edit this paragraph"), requests one after another; n-gram speculation vs none.
Prints tokens/s of each, the speed-up, the mean acceptance length (tokens per verify step)
and whether the greedy outputs are equal.

  python benchmarks/spec_decode.py --num-speculative-tokens 4

GPU: a preset shape with dummy weights (which accept nothing by chance), at each batch size:
  - cost: time per step verifying K = 1..8 drafts (a proposer that always proposes K wrong
    tokens, so each step keeps one) against a plain decode step (CUDA graphs);
  - forced acceptance: a free oracle proposer (the tokens a plain greedy run produced; in
    bf16, where a verify step may pick other near-tied tokens, then the speculating
    engine's own output, rerun until it reproduces itself: `--oracle-rounds`) proposing
    K = 4 drafts of which the first L - 1 are right: the measured speed-up at
    acceptance length L = 2, 3, 4 (and 5: all right), next to the one derived from the cost
    side (L * t_decode / t_verify(4));
  - the ceiling with a draft model that is the target itself (same dummy weights): all
    accepted, but the draft costs a target forward per proposal.

  python benchmarks/spec_decode.py --preset llama-3-8b --device cuda --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from pagedllm import LLM, SamplingParams

PARAGRAPHS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He cleaned the "
    "great lens, trimmed the wick and lit the lamp, and then he sat by the window with a cup "
    "of tea, watching the ships pass far out at sea.",
    "Our team meets every Monday at nine to review the week's goals. Each person shares what "
    "they finished, what they are working on, and anything that blocks them, and the meeting "
    "ends with a short list of decisions and owners.",
    "To bake the bread, mix the flour, water, salt and yeast into a rough dough, let it rest "
    "for an hour, fold it twice, shape it into a round loaf and bake it in a hot oven until "
    "the crust is deep brown and sounds hollow when tapped.",
]
TASKS = ["Repeat this paragraph exactly:\n\n{p}",
         "Rewrite this paragraph in the past tense, changing nothing else:\n\n{p}",
         "Copy this paragraph, replacing every 'the' with 'a':\n\n{p}"]


def copy_workload() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": t.format(p=p)}] for p in PARAGRAPHS for t in TASKS]


def take_spec_stats(llm: LLM) -> tuple[int, int, int]:
    it = llm.engine.stats.take()
    return it.spec_num_drafts, it.spec_num_draft_tokens, it.spec_num_accepted_tokens


def acceptance_length(drafts: int, accepted: int) -> float:
    return 1 + accepted / drafts if drafts else float("nan")


# ---------------------------------------------------------------- CPU: real model, n-gram
def run_cpu(args: argparse.Namespace) -> None:
    """Both engines stay loaded and take turns, round after round, so that a shared
    machine's load hits both alike; the speed-up is the median of the rounds' ratios."""
    common: dict[str, Any] = dict(device=args.device, max_model_len=2048)
    if args.dtype:
        common["dtype"] = args.dtype
    chats = copy_workload()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    engines = {"none": LLM(**common), "ngram": LLM(**common, speculative_config={
        "method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_max": args.prompt_lookup_max})}
    outputs: dict[str, list] = {}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    spec_totals = [0, 0, 0]
    for llm in engines.values():
        llm.chat(chats[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        take_spec_stats(llm)
    for r in range(args.rounds):
        for name, llm in engines.items():
            outs, tokens = [], 0
            start = time.perf_counter()
            for chat in chats:  # one client: one request at a time
                out = llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
                outs.append(out.token_ids)
                tokens += len(out.token_ids)
            elapsed = time.perf_counter() - start
            outputs[name] = outs
            rates[name].append(tokens / elapsed)
            counts = take_spec_stats(llm)
            spec_totals = [a + b for a, b in zip(spec_totals, counts)]
            print(f"round {r}: {name:>5}: {tokens} tokens in {elapsed:.2f} s = "
                  f"{tokens / elapsed:.1f} tok/s", flush=True)
    drafts, draft_tokens, accepted = spec_totals
    ratios = [s / n for s, n in zip(rates["ngram"], rates["none"])]
    print(f"n-gram K={args.num_speculative_tokens}: mean acceptance length "
          f"{acceptance_length(drafts, accepted):.2f}, draft acceptance "
          f"{100 * accepted / max(draft_tokens, 1):.1f}%, greedy outputs equal: "
          f"{outputs['none'] == outputs['ngram']}")
    print(f"speed-up n-gram / none: median {float(np.median(ratios)):.2f}x over "
          f"{len(ratios)} rounds ({', '.join(f'{x:.2f}' for x in ratios)})")


# ---------------------------------------------------------------- GPU: preset, dummy weights
class FixedProposer:
    """Proposes, for each request, up to `k` tokens: the first `right` of them the tokens a
    plain greedy run produced there, the others wrong (a benchmark's stand-in for a
    proposer of known quality; it costs nothing, like n-gram lookup). `expected` maps a
    prompt to its greedy output."""

    def __init__(self, expected: dict[tuple[int, ...], list[int]], prompt_len: int, k: int,
                 right: int) -> None:
        self.expected = expected
        self.prompt_len = prompt_len
        self.k = k
        self.right = right

    def propose(self, request_id: str, tokens: list[int], limit: int) -> list[int]:
        k = min(self.k, limit)
        want = self.expected[tuple(tokens[:self.prompt_len])]
        done = len(tokens) - self.prompt_len
        good = want[done:done + min(self.right, k)]
        bad = [(t + 1) % 1000 + 1 for t in want[done + len(good):done + k]]
        return good + bad[:k - len(good)]

    def forget(self, request_id: str) -> None:
        pass


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    take_spec_stats(llm)
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [o.outputs[0].token_ids for o in outs]


def release(llm: LLM) -> None:
    import gc

    import torch

    llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_gpu(args: argparse.Namespace) -> None:
    from pagedllm.benchmarks.presets import preset_folder

    folder = preset_folder(args.preset)
    common: dict[str, Any] = dict(device=args.device, load_format="dummy", max_model_len=2048,
                                  skip_tokenizer_init=True,
                                  dtype=args.dtype or "auto", seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 20000, args.prompt_len).tolist()
               for _ in range(max(args.batch_sizes))]
    n = args.max_tokens
    plain = LLM(folder, **common)  # async scheduling and decode CUDA graphs
    base: dict[int, float] = {}
    expected: dict[tuple[int, ...], list[int]] = {}
    for b in args.batch_sizes:
        elapsed, outs = timed_generate(plain, prompts[:b], n)
        base[b] = elapsed / n
        expected.update({tuple(p): o for p, o in zip(prompts[:b], outs)})
        print(f"batch {b}: plain decode {1e3 * base[b]:.2f} ms/step, "
              f"{b * n / elapsed:.0f} tok/s", flush=True)
    release(plain)
    # One speculating engine; the benchmark's proposer decides K and how many are right.
    llm = LLM(folder, **common, speculative_config={"method": "ngram",
                                                    "num_speculative_tokens": 8})
    scheduler = llm.engine.scheduler
    verify: dict[tuple[int, int], float] = {}
    for b in args.batch_sizes:
        for k in range(1, 9):  # cost side: K drafts verified per step, none right
            scheduler.ngram = FixedProposer(expected, args.prompt_len, k, 0)
            elapsed, outs = timed_generate(llm, prompts[:b], n)
            drafts, _, accepted = take_spec_stats(llm)
            verify[b, k] = elapsed / (drafts / b if drafts else n)
            print(f"batch {b}: verify K={k}: {1e3 * verify[b, k]:.2f} ms/step = "
                  f"{verify[b, k] / base[b]:.2f}x a decode step (accepted {accepted})",
                  flush=True)
        for k, length in [(4, 2), (4, 3), (4, 4), (4, 5), (1, 2), (2, 3), (3, 4)]:
            # In bf16 a verify step may pick other near-tied tokens than the plain run, and
            # the oracle's "right" drafts are then wrong from there on: rerun with the
            # speculating engine's own output as the oracle until it reproduces itself.
            oracle = expected
            for rounds in range(1, args.oracle_rounds + 1):  # noqa: B007 (printed below)
                scheduler.ngram = FixedProposer(oracle, args.prompt_len, k, length - 1)
                elapsed, outs = timed_generate(llm, prompts[:b], n)
                drafts, _, accepted = take_spec_stats(llm)
                same = outs == [oracle[tuple(p)] for p in prompts[:b]]
                if same:
                    break
                oracle = {tuple(p): o for p, o in zip(prompts[:b], outs)}
            print(f"batch {b}: K={k}, acceptance length {length}: measured "
                  f"{base[b] * n / elapsed:.2f}x (mean acceptance length "
                  f"{acceptance_length(drafts, accepted):.2f}, outputs equal to the oracle: "
                  f"{same}, oracle rounds {rounds}); derived L * t_decode / t_verify = "
                  f"{length * base[b] / verify[b, k]:.2f}x", flush=True)
    release(llm)
    k = 4
    llm = LLM(folder, **common, speculative_config={"model": folder, "num_speculative_tokens": k})
    for b in args.batch_sizes:
        elapsed, outs = timed_generate(llm, prompts[:b], n)
        drafts, _, accepted = take_spec_stats(llm)
        print(f"batch {b}: draft = the target itself, K={k}: {base[b] * n / elapsed:.2f}x "
              f"(mean acceptance length {acceptance_length(drafts, accepted):.2f})", flush=True)
    release(llm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", help="GPU mode: a preset shape with dummy weights "
                                     "(e.g. llama-3-8b); default: the real default model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per request (default: 160 CPU, 256 GPU)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3, help="CPU: alternating rounds")
    ap.add_argument("--oracle-rounds", type=int, default=4,
                    help="GPU: runs to make the forced-acceptance oracle agree with the "
                         "speculating engine's own greedy output")
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()
    if args.preset:
        args.max_tokens = args.max_tokens or 256
        run_gpu(args)
    else:
        args.max_tokens = args.max_tokens or 160
        run_cpu(args)


if __name__ == "__main__":
    main()
