"""POST /tokenize and POST /detokenize (vLLM's shapes)."""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels


class OpenAIServingTokenization(OpenAIServing):
    """Tokenize a prompt (or a chat rendered by the template) and decode token ids."""

    def __init__(self, engine: Any, models: OpenAIServingModels,
                 chat: OpenAIServingChat) -> None:
        super().__init__(engine, models)
        self.chat = chat

    def tokenize_request(self, request: TokenizeRequest) -> TokenizeResponse:
        self.models.resolve(request.model)
        self.log_ignored_fields(request)
        if isinstance(request, TokenizeChatRequest):
            text = self.chat.render(request)
        else:
            text = request.prompt
        ids = self.tokenize(text, request.add_special_tokens)
        token_strs = None
        if request.return_token_strs:
            token_strs = [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids,
                                token_strs=token_strs)

    def detokenize_request(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.models.resolve(request.model)
        self.log_ignored_fields(request)
        for tid in request.tokens:
            self.check_token_id(tid, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))
