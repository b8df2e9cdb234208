"""Pick a request's backend and check that it takes the request (no tokenizer needed).

Called where a request enters the engine, so that a bad schema, regex or grammar is a
ValueError (HTTP 400) carrying the backend's diagnosis, before anything is compiled.
"""

from __future__ import annotations

from pagedllm.structured_output.backend_guidance import validate_guidance
from pagedllm.structured_output.backend_xgrammar import validate_xgrammar
from pagedllm.structured_output.config import (
    BackendName,
    StructuredOutputsConfig,
    backend_available,
)
from pagedllm.structured_output.params import StructuredOutputsParams

_VALIDATORS = {"xgrammar": validate_xgrammar, "guidance": validate_guidance}


def validate_structured_outputs(params: StructuredOutputsParams,
                                config: StructuredOutputsConfig) -> BackendName:
    """The backend that will run ``params``; ValueError if it cannot.

    A configured backend is used as is. "auto" follows vLLM: xgrammar when it is installed
    and takes the request (its features and its parser), otherwise guidance; when neither
    takes it, guidance's diagnosis is raised.
    """
    if not isinstance(params, StructuredOutputsParams):
        raise ValueError("structured_outputs must be a StructuredOutputsParams, "
                         f"got {type(params).__name__}.")
    if config.backend != "auto":
        _VALIDATORS[config.backend](params)
        return config.backend  # type: ignore[return-value]
    if backend_available("xgrammar"):
        try:
            validate_xgrammar(params)
            return "xgrammar"
        except ValueError:
            if not backend_available("guidance"):
                raise
    validate_guidance(params)
    return "guidance"
