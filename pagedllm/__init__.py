"""pagedllm: a high-throughput LLM inference and serving engine."""
