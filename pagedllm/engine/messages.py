"""What crosses between the front-end and the engine core, and its wire encoding.

The front-end sends `EngineCoreRequest`s (token ids plus validated sampling params) and
aborts; the core answers every step with one `EngineCoreOutputs` per front-end: per request
the new token ids, a finish reason when the core finished it, logprob arrays, plus the step's
stats. Messages are msgspec msgpack; numpy arrays travel as raw bytes in a msgpack extension,
never pickled. The sampling params of a new request are the one pickled part (they arrive
once per request, not per token).
"""

from __future__ import annotations

import pickle
from typing import Any

import msgspec
import numpy as np

from pagedllm.metrics.stats import IterationStats, SchedulerSnapshot
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.output import LogprobsLists

_NDARRAY_EXT = 1


class EngineCoreRequest(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """One request as the core takes it: already tokenized and validated."""

    request_id: str
    prompt_token_ids: list[int]
    params: bytes  # pickled SamplingParams (see `sampling_params`)
    eos_token_id: int | None
    arrival_time: float
    client_index: int = 0

    @classmethod
    def make(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
             eos_token_id: int | None, arrival_time: float,
             client_index: int = 0) -> EngineCoreRequest:
        return cls(request_id, prompt_token_ids, pickle.dumps(params, protocol=5),
                   eos_token_id, arrival_time, client_index)

    def sampling_params(self) -> SamplingParams:
        return pickle.loads(self.params)


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One sequence's progress in one step (a child id for n > 1 requests)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" when the core finished it
    stop_reason: int | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0
    logprobs: LogprobsLists | None = None
    prompt_logprobs: LogprobsLists | None = None


class EngineCoreOutputs(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """Everything one front-end gets from one core step."""

    outputs: list[EngineCoreOutput] = []
    iteration: IterationStats | None = None
    snapshot: SchedulerSnapshot | None = None
    timestamp: float = 0.0


class UtilityCall(msgspec.Struct, tag=True, array_like=True):
    """Run `EngineCore.<method>(*args)` between two steps and send the result back."""

    call_id: int
    method: str
    args: list[Any]
    client_index: int = 0


class UtilityResult(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: str | None = None


class Abort(msgspec.Struct, tag=True, array_like=True):
    """Finish requests (parent ids) wherever they are; `reason` is "abort" or "stop" (a stop
    string the front-end found)."""

    request_ids: list[str]
    reason: str = "abort"


class Hello(msgspec.Struct, tag=True, array_like=True):
    """A front-end's first message: the core may now send to its output socket."""

    client_index: int


class EngineCoreReady(msgspec.Struct, tag=True, array_like=True):
    """The core's first message: it loaded the model and has this many KV blocks."""

    num_blocks: int
    pid: int


class EngineCoreFailed(msgspec.Struct, tag=True, array_like=True):
    """The core's last message when it fails: what went wrong, for the front-end's log."""

    error_type: str
    message: str
    traceback: str


InputMessage = EngineCoreRequest | Abort | UtilityCall | Hello
OutputMessage = EngineCoreOutputs | UtilityResult | EngineCoreReady | EngineCoreFailed


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        header = msgspec.msgpack.encode((arr.dtype.str, arr.shape))
        return msgspec.msgpack.Ext(_NDARRAY_EXT, len(header).to_bytes(4, "little") + header
                                   + arr.tobytes())
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise NotImplementedError(f"cannot decode {kind}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _NDARRAY_EXT:
        raise NotImplementedError(f"unknown msgpack extension {code}")
    size = int.from_bytes(data[:4], "little")
    dtype, shape = msgspec.msgpack.decode(data[4:4 + size])
    return np.frombuffer(data[4 + size:], dtype=np.dtype(dtype)).reshape(shape).copy()


class Encoder:
    """msgpack encoder for the messages above (numpy arrays as raw bytes)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)

    def encode(self, msg: Any) -> bytes:
        return self._encoder.encode(msg)


class Decoder:
    """msgpack decoder for one of the message unions."""

    def __init__(self, kind: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(kind, ext_hook=_ext_hook, dec_hook=_dec_hook)

    def decode(self, data: bytes | memoryview) -> Any:
        return self._decoder.decode(data)


def child_request_ids(request_id: str, n: int) -> list[str]:
    """Ids of the sequences of a request: itself for n = 1, `<id>#<i>` otherwise."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
