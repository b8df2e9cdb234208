"""pagedllm: a high-throughput LLM inference and serving engine."""

from pagedllm.config import EngineArgs
from pagedllm.entrypoints.llm import LLM
from pagedllm.outputs import (
    CompletionOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.structured_output.params import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "EngineArgs",
    "PoolingRequestOutput",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]
