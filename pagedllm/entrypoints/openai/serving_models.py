"""The served model names: GET /v1/models and the `model` field check of every request."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pagedllm.entrypoints.openai.errors import NotFoundError
from pagedllm.entrypoints.openai.protocol import ModelCard, ModelList


class OpenAIServingModels:
    """Knows which names the one loaded model answers to (`--served-model-name`)."""

    def __init__(self, served_model_names: Sequence[str], model_path: str | None,
                 max_model_len: int) -> None:
        if not served_model_names:
            raise ValueError("At least one served model name is needed.")
        self.served_model_names = list(served_model_names)
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.created = int(time.time())

    @property
    def default_name(self) -> str:
        """The name responses report when a request leaves `model` out."""
        return self.served_model_names[0]

    def resolve(self, requested: str | None) -> str:
        """Return the model name to report; raise NotFoundError (404) for an unknown name."""
        if requested is None or requested == "":
            return self.default_name
        if requested in self.served_model_names:
            return requested
        raise NotFoundError(
            f"The model `{requested}` does not exist. Served models: "
            + ", ".join(f"`{name}`" for name in self.served_model_names) + ".",
            param="model",
        )

    def list_models(self) -> ModelList:
        return ModelList(data=[self.card(name) for name in self.served_model_names])

    def card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created, root=self.model_path or name,
                         max_model_len=self.max_model_len)
