"""POST /v1/embeddings for pooling models (OpenAI's shape, plus vLLM's extra fields).

Input is a string, a list of strings, a list of token ids or a list of token-id lists.
`encoding_format` "float" returns lists of floats; "base64" returns the little-endian
float32 bytes of each vector, base64-encoded (what the official clients ask for by default).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import Request

from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.streaming import cancel_on_disconnect
from pagedllm.pooling_params import PoolingParams

ENCODING_FORMATS = ("float", "base64")


def encode_base64(vector: Any) -> str:
    """A vector as base64 of its little-endian float32 bytes."""
    data = np.asarray(vector, dtype="<f4").tobytes()
    return base64.b64encode(data).decode("ascii")


class OpenAIServingEmbedding(OpenAIServing):
    """Embeds inputs with an `AsyncPoolingEngine` (anything with `async encode`)."""

    request_id_prefix = "embd"

    def __init__(self, engine: Any, models: OpenAIServingModels) -> None:
        super().__init__(engine, models)
        self.max_model_len = int(getattr(engine, "max_model_len", self.max_model_len))
        hidden = getattr(engine, "hidden_size", None)
        if hidden is None:
            hidden = getattr(getattr(self.model_config, "hf_config", None), "hidden_size", 0)
        self.hidden_size = int(hidden)

    def _prompts(self, request: EmbeddingRequest) -> list[Any]:
        """The request's inputs as engine prompts (strings or token-id dicts)."""
        inp = request.input
        items: list[Any] = [inp] if isinstance(inp, str) else list(inp)
        if inp and isinstance(inp, list) and all(isinstance(t, int) for t in inp):
            items = [inp]  # one prompt given as token ids
        if not items:
            raise BadRequestError("input is empty; give a string, a list of strings or token "
                                  "ids.", param="input")
        prompts: list[Any] = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise BadRequestError("input contains an empty string; every input needs "
                                          "at least one character.", param="input")
                prompts.append(item)
            else:
                if not item:
                    raise BadRequestError("input contains an empty token list.", param="input")
                for tid in item:
                    self.check_token_id(tid, "input")
                prompts.append({"prompt_token_ids": list(item)})
        return prompts

    def _pooling_params(self, request: EmbeddingRequest) -> PoolingParams:
        dims = request.dimensions
        if dims is not None and not 1 <= dims <= self.hidden_size:
            raise BadRequestError(
                f"dimensions must be between 1 and the model's embedding size "
                f"({self.hidden_size}), got {dims}.", param="dimensions")
        try:
            return PoolingParams(normalize=request.normalize, dimensions=dims,
                                 truncate_prompt_tokens=request.truncate_prompt_tokens)
        except ValueError as e:
            param = "truncate_prompt_tokens" if "truncate" in str(e) else None
            raise BadRequestError(str(e), param=param) from e

    async def create_embedding(self, request: EmbeddingRequest,
                               raw_request: Request) -> EmbeddingResponse | None:
        """Embed the request's inputs; None if the client disconnected first."""
        model_name = self.models.resolve(request.model)
        self.log_ignored_fields(request)
        if request.encoding_format not in ENCODING_FORMATS:
            raise BadRequestError(
                f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, got "
                f"{request.encoding_format!r}.", param="encoding_format")
        params = self._pooling_params(request)
        prompts = self._prompts(request)
        try:
            outputs = await cancel_on_disconnect(raw_request,
                                                 self.engine.encode(prompts, params))
        except ValueError as e:  # the engine validates inputs before running anything
            raise BadRequestError(str(e), param="input") from e
        if outputs is None:
            return None
        data: list[EmbeddingData] = []
        num_tokens = 0
        for i, out in enumerate(outputs):
            vector = out.outputs.data.float().numpy()
            embedding: list[float] | str = (encode_base64(vector)
                                            if request.encoding_format == "base64"
                                            else vector.tolist())
            data.append(EmbeddingData(index=i, embedding=embedding))
            num_tokens += len(out.prompt_token_ids)
        return EmbeddingResponse(
            id=self.request_id(raw_request, request),
            model=model_name,
            data=data,
            usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
        )
