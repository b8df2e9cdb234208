"""StructuredOutputsConfig: the engine-wide choice of grammar backend, and what each needs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

from pagedllm.utils import config_dict

BackendName = Literal["xgrammar", "guidance"]
BACKENDS: tuple[str, ...] = ("auto", "xgrammar", "guidance")

# The package each backend imports, and how to get it.
_PACKAGES = {"xgrammar": "xgrammar", "guidance": "llguidance"}
_INSTALL = {
    "xgrammar": "pip install 'pagedllm[xgrammar]' (or pip install xgrammar)",
    "guidance": "pip install llguidance",
}


def backend_available(name: str) -> bool:
    """Whether the package of backend ``name`` can be imported (found without importing)."""
    return importlib.util.find_spec(_PACKAGES[name]) is not None


def require_backend(name: str) -> None:
    """Raise ValueError saying what to install when backend ``name``'s package is missing."""
    if not backend_available(name):
        raise ValueError(f"The {name} structured-outputs backend needs the "
                         f"{_PACKAGES[name]} package, which is not installed: {_INSTALL[name]}.")


@dataclass
class StructuredOutputsConfig:
    """Engine-wide structured-outputs settings.

    ``backend``: "auto" picks per request (xgrammar when it is installed and takes the request,
    otherwise guidance), or one backend for every request. ``disable_any_whitespace``: compact
    JSON for every request. ``compile_workers``: threads that compile grammars off the step
    loop. ``grammar_cache_size``: compiled grammars kept, by spec (least recently used go).
    """

    backend: str = "auto"
    disable_any_whitespace: bool = False
    compile_workers: int = 2
    grammar_cache_size: int = 256

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"structured outputs backend must be one of {list(BACKENDS)}, "
                             f"got {self.backend!r}.")
        if self.backend != "auto":
            require_backend(self.backend)
        elif not any(backend_available(b) for b in _PACKAGES):
            raise ValueError("Structured outputs need llguidance or xgrammar: "
                             f"{_INSTALL['guidance']}.")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("disable_any_whitespace must be a boolean.")
        for name in ("compile_workers", "grammar_cache_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"structured outputs {name} must be an integer >= 1, "
                                 f"got {value!r}.")

    @classmethod
    def parse(cls, value: StructuredOutputsConfig | dict[str, Any] | str | None
              ) -> StructuredOutputsConfig:
        """From the CLI / LLM argument: a config, a dict, a JSON object string or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        value = config_dict(value, "structured_outputs_config", "--structured-outputs-config",
                            '{"backend": "guidance"}', cls.__dataclass_fields__)
        return cls(**value)
