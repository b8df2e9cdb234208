"""The OpenAI-compatible HTTP server: FastAPI app factory, API-key check and uvicorn runner.

Endpoints (vLLM's paths):
    GET  /health                 200 while the engine loop is alive, else 503 (no key needed)
    GET  /version                {"version": ...}
    GET  /v1/models              the served model names
    GET  /v1/models/{model}      one of them
    POST /v1/completions         text completions (stream with "stream": true)
    POST /v1/chat/completions    chat completions through the model's chat template
    POST /v1/embeddings          embeddings (pooling models, e.g. `--runner pooling`)
    POST /tokenize               {"prompt": ...} or {"messages": [...]} -> token ids
    POST /detokenize             {"tokens": [...]} -> text
    GET  /stats                  engine scheduler/KV-cache counters (num_running, num_waiting,
                                 num_free_blocks, num_cached_blocks, num_total_blocks, ...)
    GET  /metrics                Prometheus metrics (pagedllm:* names, model_name label)
    GET  /dashboard              live dashboard page (no key needed; it polls /dashboard/data)

Run it with `pagedllm serve MODEL` or `python -m pagedllm.entrypoints.openai.api_server
--model MODEL`. The engine lives in this process; the app reaches it through `app.state`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from importlib import metadata
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.entrypoints.openai.chat_utils import load_chat_template
from pagedllm.entrypoints.openai.errors import (
    BadRequestError,
    error_json,
    install_error_handlers,
)
from pagedllm.entrypoints.openai.observability import DASHBOARD_PATH, install_observability
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    VersionResponse,
)
from pagedllm.entrypoints.openai.serving_base import StreamRegistry
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.serving_tokenize import OpenAIServingTokenization

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAGEDLLM_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Paths that never need the API key (load balancers and orchestrators poll them; the
# dashboard page is static and sends the key, from its URL's #key=..., with its polls).
OPEN_PATHS = frozenset({"/health", DASHBOARD_PATH})
GRACEFUL_SHUTDOWN_S = 5


def server_version() -> str:
    """The installed pagedllm version ("unknown" when running from a source tree)."""
    import pagedllm

    version = getattr(pagedllm, "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version("pagedllm")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------- auth
class APIKeyMiddleware:
    """Reject requests without `Authorization: Bearer <key>` (constant-time compare) with 401.

    A pure ASGI middleware, so streaming responses and disconnect detection are untouched.
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self._key = api_key.encode("utf-8")
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or scope.get("path") in self.open_paths):
            await self.app(scope, receive, send)
            return
        auth = Headers(scope=scope).get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8"), self._key):
            message = ("Missing API key: send it as 'Authorization: Bearer <key>'."
                       if not auth else "Incorrect API key provided.")
            response = error_json(message, 401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- app
def _served_names(args: argparse.Namespace, engine: Any) -> list[str]:
    names = getattr(args, "served_model_name", None)
    if isinstance(names, str):
        names = [names]
    if names:
        return list(names)
    config = engine.model_config
    name = getattr(config, "served_model_name", None) or getattr(config, "model", None)
    if not name:  # no model given: the engine serves its built-in default model
        from pagedllm.models.loader.gguf_loader import DEFAULT_MODEL_NAME

        name = DEFAULT_MODEL_NAME
    return [name]


def build_app(engine: Any, args: argparse.Namespace | None = None) -> FastAPI:
    """Create the FastAPI app serving `engine` (an `AsyncLLM`, or an `AsyncPoolingEngine`
    for a pooling model, which serves /v1/embeddings instead of completions and chat).

    `args` holds the server options (`served_model_name`, `api_key`, `chat_template`); missing
    ones take their defaults. The API key also comes from $PAGEDLLM_API_KEY.
    """
    args = args if args is not None else argparse.Namespace()
    app = FastAPI(title="pagedllm OpenAI-compatible API", version=server_version())
    config = engine.model_config
    root = getattr(config, "model", None) or getattr(config, "model_path", None)
    models = OpenAIServingModels(_served_names(args, engine), root, int(config.max_model_len))
    chat_template = load_chat_template(getattr(args, "chat_template", None))
    streams = StreamRegistry()
    chat = OpenAIServingChat(engine, models, chat_template, streams)
    app.state.engine = engine
    app.state.models = models
    app.state.streams = streams  # in-flight generations; drained on shutdown
    app.state.completion = OpenAIServingCompletion(engine, models, streams)
    app.state.chat = chat
    app.state.tokenization = OpenAIServingTokenization(engine, models, chat)
    app.state.embedding = (OpenAIServingEmbedding(engine, models)
                           if _is_pooling(engine) else None)

    install_error_handlers(app)
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    _add_routes(app)
    install_observability(app, engine, models.served_model_names[0])
    return app


def _is_pooling(engine: Any) -> bool:
    """True when `engine` serves a pooling (embedding) model."""
    return getattr(engine.model_config, "runner", "generate") == "pooling"


def _check_generate_runner(engine: Any) -> None:
    if _is_pooling(engine):
        raise BadRequestError("This model is served as a pooling (embedding) model; it does "
                              "not generate text. Use POST /v1/embeddings.", param="model")


def _add_routes(app: FastAPI) -> None:
    """Register every endpoint on `app` (handlers find their state on `request.app.state`)."""

    @app.get("/health", summary="200 while the engine is alive")
    async def health(raw_request: Request) -> Response:
        try:
            await raw_request.app.state.engine.check_health()
        except Exception as e:
            logger.error("Health check failed: %s", e)
            return error_json(f"The engine is not healthy: {e}", 503)
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=server_version())

    @app.get("/v1/models")
    async def list_models(raw_request: Request) -> JSONResponse:
        return JSONResponse(raw_request.app.state.models.list_models().model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, raw_request: Request) -> JSONResponse:
        models: OpenAIServingModels = raw_request.app.state.models
        return JSONResponse(models.card(models.resolve(model_id)).model_dump())

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        _check_generate_runner(raw_request.app.state.engine)
        return await raw_request.app.state.completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
        _check_generate_runner(raw_request.app.state.engine)
        return await raw_request.app.state.chat.create_chat_completion(request, raw_request)

    @app.post("/v1/embeddings")
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
        serving: OpenAIServingEmbedding | None = raw_request.app.state.embedding
        if serving is None:
            raise BadRequestError("This model generates text and has no embeddings endpoint; "
                                  "serve an embedding model (e.g. with --runner pooling).",
                                  param="model")
        result = await serving.create_embedding(request, raw_request)
        if result is None:  # client went away
            return Response(status_code=499)
        return JSONResponse(result.model_dump())

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest, raw_request: Request) -> JSONResponse:
        result = raw_request.app.state.tokenization.tokenize_request(request)
        return JSONResponse(result.model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest, raw_request: Request) -> JSONResponse:
        result = raw_request.app.state.tokenization.detokenize_request(request)
        return JSONResponse(result.model_dump())

    @app.get("/stats", summary="Engine scheduler and KV cache counters")
    async def stats(raw_request: Request) -> JSONResponse:
        return JSONResponse(jsonable_encoder(raw_request.app.state.engine.get_stats()))


# ---------------------------------------------------------------------------- CLI options
def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server flags and every engine flag (`EngineArgs.add_cli_args`) to `parser`."""
    from pagedllm.config import EngineArgs

    g = parser.add_argument_group("server")
    g.add_argument("--model", dest="model", default=None,
                   help="Model to serve: a hub id (e.g. Qwen/Qwen2.5-1.5B-Instruct), a local "
                        "folder or a .gguf file. Default: the engine's built-in default model.")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on. The default 127.0.0.1 only accepts local "
                        "connections; use --host 0.0.0.0 to expose the server on all "
                        "interfaces (then also set --api-key).")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on.")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="Name(s) clients use in the 'model' field and that /v1/models lists "
                        "(default: the model argument). The first one is reported in "
                        "responses when a request omits 'model'.")
    g.add_argument("--api-key", default=None,
                   help=f"Require 'Authorization: Bearer <key>' on every endpoint except "
                        f"/health (compared in constant time). Also read from "
                        f"${API_KEY_ENV}.")
    g.add_argument("--chat-template", default=None,
                   help="Chat template for /v1/chat/completions: a Jinja file or the template "
                        "text itself (default: the tokenizer's chat_template).")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="Log level of pagedllm and uvicorn.")
    g.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="Do not log one line per HTTP request.")
    g.add_argument("--log-stats-interval", type=float, default=5.0, metavar="SECONDS",
                   help="Seconds between the throughput / queue / KV-usage log lines while "
                        "requests are served (silent when idle; --disable-log-stats turns "
                        "them off).")
    EngineArgs.add_cli_args(parser)
    return parser


def engine_args_from(args: argparse.Namespace) -> Any:
    """EngineArgs from parsed CLI args (first served name, chat template text)."""
    from pagedllm.config import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    names = getattr(args, "served_model_name", None)
    if isinstance(names, (list, tuple)):
        engine_args = dataclasses.replace(engine_args,
                                          served_model_name=names[0] if names else None)
    template = load_chat_template(getattr(args, "chat_template", None))
    return dataclasses.replace(engine_args, chat_template=template)


def configure_logging(level: str) -> None:
    """Log pagedllm messages to stderr at `level`."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("pagedllm").setLevel(level.upper())


# ---------------------------------------------------------------------------- running
class _Server(uvicorn.Server):
    """uvicorn server whose SIGINT/SIGTERM handling ends in a normal return (exit code 0).

    uvicorn re-raises the caught signal after its graceful shutdown, which would kill the
    process before the engine is shut down; here the caller gets control back instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # End in-flight generations first (streams get finish_reason "abort" and [DONE]),
        # so that open connections close before the graceful-shutdown timeout.
        streams = getattr(getattr(self.config.app, "state", None), "streams", None)
        if streams is not None and len(streams):
            logger.info("Aborting %d in-flight request(s).", len(streams))
            streams.drain()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info("Received %s; shutting down.", signal.Signals(sig).name)
        super().handle_exit(sig, frame)


def _describe(engine: Any, engine_args: Any) -> str:
    config = engine.model_config
    device = getattr(engine_args, "device", "auto")
    for holder in ("engine_config", "config", "vllm_config"):
        device_config = getattr(getattr(engine, holder, None), "device", None)
        if device_config is not None and hasattr(device_config, "device"):
            device = device_config.device
            break
    try:
        stats = engine.get_stats()
        blocks = f"{stats.get('num_total_blocks')} KV blocks"
    except Exception:
        blocks = "unknown KV blocks"
    if _is_pooling(engine):
        blocks = "pooling runner"
    model = getattr(config, "model", None) or getattr(config, "model_path", None)
    return (f"model {model!r} on {device}, {blocks}, "
            f"max_model_len {config.max_model_len}")


def run_server(args: argparse.Namespace) -> int:
    """Load the engine, serve until SIGINT/SIGTERM, then shut the engine down."""
    configure_logging(args.log_level)
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.engine.async_pooling import AsyncPoolingEngine

    interval = getattr(args, "log_stats_interval", 5.0)
    if interval <= 0:
        logger.error("--log-stats-interval must be > 0 seconds (got %s); use "
                     "--disable-log-stats to turn the log lines off.", interval)
        return 2
    try:
        engine_args = engine_args_from(args)
        engine_config = engine_args.create_engine_config()
        engine: Any
        if engine_config.model.runner == "pooling":
            engine = AsyncPoolingEngine(engine_config)
        else:
            engine = AsyncLLM(engine_config, log_stats_interval=interval)
    except ValueError as e:  # bad flags or model: say what to fix, no traceback
        logger.error("Cannot start the engine: %s", e)
        return 2
    try:
        app = build_app(engine, args)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = _Server(config)
        host = f"[{args.host}]" if ":" in args.host else args.host
        logger.info("Serving %s as %s", _describe(engine, engine_args),
                    ", ".join(app.state.models.served_model_names))
        logger.info("OpenAI-compatible API at http://%s:%d/v1 (health: /health, metrics: "
                    "/metrics, dashboard: /dashboard)", host, args.port)
        server.run()
        if not server.started:
            logger.error("The server could not start (is port %d free?).", args.port)
            return 1
    finally:
        logger.info("Shutting down the engine.")
        engine.shutdown()
    logger.info("Server stopped.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pagedllm.entrypoints.openai.api_server --model MODEL [flags]`."""
    parser = argparse.ArgumentParser(
        prog="python -m pagedllm.entrypoints.openai.api_server",
        description="Run the pagedllm OpenAI-compatible server (same flags as "
                    "'pagedllm serve').")
    make_arg_parser(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
