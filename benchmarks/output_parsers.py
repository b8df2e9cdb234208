"""Cost of streamed output parsing: microseconds per token that a tool-call or reasoning
stream adds, for long outputs (each step re-reads the whole text, so the cost per token
grows with the output length).

    python benchmarks/output_parsers.py --tokens 500 2000
"""

from __future__ import annotations

import argparse
import json
import time

from pagedllm.entrypoints.openai.reasoning import ReasoningParserRegistry
from pagedllm.entrypoints.openai.tool_parsers import ToolParserRegistry
from pagedllm.models.loader.gguf_loader import find_default_model, load_gguf_tokenizer

WORDS = "the quick brown fox jumps over the lazy dog while {braces} and \"quotes\" wait"


def deltas(tokenizer, text: str, tokens: int) -> list[str]:
    """`text` cut to `tokens` tokens, as one text delta per token."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    out, prev = [], ""
    for i in range(1, len(ids) + 1):
        cur = tokenizer.decode(ids[:i])
        out.append(cur[len(prev):])
        prev = cur
    return out


def texts(words: int) -> dict[str, tuple[str, str, str]]:
    body = " ".join([WORDS] * words)
    args = json.dumps({"path": "a.py", "content": body})
    return {
        "plain answer (hermes)": ("tool", "hermes", body),
        "one long call (hermes)": ("tool", "hermes",
                                   f'<tool_call>\n{{"name": "write", "arguments": {args}}}\n'
                                   "</tool_call>"),
        "one long call (qwen3_coder)": ("tool", "qwen3_coder",
                                        "<tool_call>\n<function=write>\n<parameter=path>\na.py"
                                        f"\n</parameter>\n<parameter=content>\n{body}\n"
                                        "</parameter>\n</function>\n</tool_call>"),
        "long thinking (qwen3)": ("reasoning", "qwen3", f"<think>\n{body}\n</think>\n\nok"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[500, 2000])
    args = ap.parse_args()
    tokenizer = load_gguf_tokenizer(find_default_model())
    tools, reasoning = ToolParserRegistry(), ReasoningParserRegistry()
    print("| output | tokens | us/token | total ms |")
    print("|---|---|---|---|")
    for n in args.tokens:
        for label, (kind, name, text) in texts(n // 4).items():
            pieces = deltas(tokenizer, text, n)
            parser = (tools if kind == "tool" else reasoning).get(name)()
            stream = parser.stream()
            start = time.perf_counter()
            for piece in pieces:
                stream.feed(piece)
            stream.finish()
            took = time.perf_counter() - start
            print(f"| {label} | {len(pieces)} | {took / len(pieces) * 1e6:.0f} | "
                  f"{took * 1e3:.0f} |")


if __name__ == "__main__":
    main()
