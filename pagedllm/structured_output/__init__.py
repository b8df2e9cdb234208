"""Structured outputs: constrain a request's output to a JSON schema, regex, choice or grammar.

``StructuredOutputsParams`` says what; ``validate_structured_outputs`` picks the backend
(xgrammar or llguidance) and checks the request; ``StructuredOutputManager`` compiles grammars
off the step loop, caches them and fills each step's bitmask; ``GrammarBitmask`` /
``apply_token_bitmask`` mask the logits on the device.
"""

from pagedllm.structured_output.bitmask import GrammarBitmask, apply_token_bitmask
from pagedllm.structured_output.config import StructuredOutputsConfig
from pagedllm.structured_output.manager import StructuredOutputManager, StructuredOutputRequest
from pagedllm.structured_output.params import StructuredOutputKind, StructuredOutputsParams
from pagedllm.structured_output.validation import validate_structured_outputs

__all__ = [
    "GrammarBitmask",
    "StructuredOutputKind",
    "StructuredOutputManager",
    "StructuredOutputRequest",
    "StructuredOutputsConfig",
    "StructuredOutputsParams",
    "apply_token_bitmask",
    "validate_structured_outputs",
]
