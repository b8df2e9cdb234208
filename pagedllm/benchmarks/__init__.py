"""Benchmarks runnable from the CLI: `pagedllm bench serve` (online, against any
OpenAI-compatible server) and `pagedllm bench throughput` (offline engine vs HF)."""
