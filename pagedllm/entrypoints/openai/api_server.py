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
import gc
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
from pagedllm.entrypoints.openai.request_limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.serving_tokenize import OpenAIServingTokenization
from pagedllm.entrypoints.openai.startup import PHASES, StartupClock
from pagedllm.entrypoints.openai.streaming import StreamRegistry
from pagedllm.utils import freeze_startup_heap

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
    tool_parser, reasoning_parser = output_parsers(args)
    chat = OpenAIServingChat(engine, models, chat_template, streams, tool_parser,
                             reasoning_parser)
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
    app.add_middleware(BodySizeLimit, max_bytes=int(
        getattr(args, "max_request_body_bytes", None) or DEFAULT_MAX_BODY_BYTES))
    _add_routes(app)
    install_observability(app, engine, models.served_model_names[0])
    return app


def output_parsers(args: argparse.Namespace) -> tuple[Any, Any]:
    """(tool-call parser class or None, reasoning parser class or None) from the flags;
    ValueError naming the flag for unknown names or --enable-auto-tool-choice alone."""
    from pagedllm.entrypoints.openai.reasoning import ReasoningParserRegistry
    from pagedllm.entrypoints.openai.tool_parsers import ToolParserRegistry

    tool_name = getattr(args, "tool_call_parser", None)
    plugins = list(getattr(args, "tool_parser_plugin", None) or [])
    auto = bool(getattr(args, "enable_auto_tool_choice", False))
    if auto and not tool_name:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (e.g. "
                         "hermes for Qwen2.5/Qwen3/Hermes models).")
    if tool_name and not auto:
        raise ValueError("--tool-call-parser is used with --enable-auto-tool-choice; add it.")
    tool_parser = ToolParserRegistry(plugins).get(tool_name) if tool_name else None
    reasoning_name = getattr(args, "reasoning_parser", None)
    reasoning_parser = (ReasoningParserRegistry().get(reasoning_name)
                        if reasoning_name else None)
    return tool_parser, reasoning_parser


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
        engine = raw_request.app.state.engine
        read = getattr(engine, "get_stats_async", None)
        stats = await read() if read is not None else engine.get_stats()
        return JSONResponse(jsonable_encoder(stats))


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
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="Parse tool calls out of chat answers (tool_choice 'auto'); needs "
                        "--tool-call-parser.")
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="Tool-call format of the model: hermes (Qwen2.5/Qwen3/Hermes), "
                        "llama3_json, mistral, pythonic, qwen3_coder, or one a "
                        "--tool-parser-plugin file defines.")
    g.add_argument("--tool-parser-plugin", action="append", default=None, metavar="FILE",
                   help="A Python file defining a ToolParser subclass with `names` "
                        "(pagedllm.entrypoints.openai.tool_parsers.base); repeatable.")
    g.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="Separate the model's thinking into reasoning_content: qwen3, "
                        "deepseek_r1, gpt_oss.")
    g.add_argument("--api-server-count", type=int, default=1, metavar="N",
                   help="API server processes sharing the port and one engine core "
                        "(tokenizing, detokenizing and HTTP spread over N processes; "
                        "metrics count the whole engine on each).")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   metavar="BYTES",
                   help="Larger request bodies get 413 before they are read "
                        f"(default {DEFAULT_MAX_BODY_BYTES >> 20} MiB).")
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
    With a `StartupClock`, the start-up log line is written once the socket listens; then
    the start-up heap is frozen out of the garbage collector's scans (`_serve` unfreezes
    it once the server has stopped).
    """

    def __init__(self, config: uvicorn.Config, clock: StartupClock | None = None) -> None:
        super().__init__(config)
        self.clock = clock

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.clock is not None:
            self.clock.mark(PHASES[3])
            logger.info("%s", self.clock.summary())
        if self.started:  # after the ready line: its collection is not start-up time
            logger.debug("Froze %d start-up objects out of the garbage collector's scans",
                         freeze_startup_heap())

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


def _describe(engine: Any, args: Any) -> str:
    config = engine.model_config
    device = getattr(args, "device", "auto")
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
    """Load the engine, serve until SIGINT/SIGTERM, then shut the engine down.

    With `--api-server-count N > 1`, this process starts the engine core and N API server
    processes sharing the port, and supervises them."""
    clock = StartupClock()
    configure_logging(args.log_level)
    interval = getattr(args, "log_stats_interval", 5.0)
    if interval <= 0:
        logger.error("--log-stats-interval must be > 0 seconds (got %s); use "
                     "--disable-log-stats to turn the log lines off.", interval)
        return 2
    count = getattr(args, "api_server_count", 1)
    if count < 1:
        logger.error("--api-server-count must be >= 1 (got %s).", count)
        return 2
    if getattr(args, "max_request_body_bytes", 1) < 1:
        logger.error("--max-request-body-bytes must be >= 1 (got %s).",
                     args.max_request_body_bytes)
        return 2
    try:
        output_parsers(args)  # unknown parser names fail before the model loads
        clock.mark(PHASES[0])
        engine_args = engine_args_from(args)
        engine_config = engine_args.create_engine_config(usage="server")
        clock.mark(PHASES[1])
        if count > 1 and engine_config.model.runner == "pooling":
            raise ValueError("--api-server-count > 1 serves generative models only; pooling "
                             "(embedding) models run with one API server.")
        if count > 1:
            return _run_api_servers(args, engine_config, count, interval)
        engine = _make_engine(engine_config, interval)
        clock.mark(PHASES[2], _core_placement(engine))
    except ValueError as e:  # bad flags or model: say what to fix, no traceback
        logger.error("Cannot start the engine: %s", e)
        return 2
    try:
        return _serve(engine, args, clock=clock)
    finally:
        logger.info("Shutting down the engine.")
        engine.shutdown()
        logger.info("Server stopped.")


def _make_engine(engine_config: Any, interval: float) -> Any:
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.engine.async_pooling import AsyncPoolingEngine

    if engine_config.model.runner == "pooling":
        return AsyncPoolingEngine(engine_config)
    return AsyncLLM(engine_config, log_stats_interval=interval)


def _core_placement(engine: Any) -> str | None:
    """Where the engine core runs, for the start-up line."""
    from pagedllm.engine.core_thread import CoreThread

    process = getattr(getattr(engine, "core_process", None), "process", None)
    if process is None:
        return None
    return ("engine core on a thread" if isinstance(process, CoreThread)
            else "engine core in its own process")


def _serve(engine: Any, args: argparse.Namespace,
           sockets: list[socket.socket] | None = None, clock: StartupClock | None = None) -> int:
    """Run uvicorn on `engine` until SIGINT/SIGTERM; 0 when it stopped normally."""
    app = build_app(engine, args)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(config, clock)
    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("Serving %s as %s", _describe(engine, args),
                ", ".join(app.state.models.served_model_names))
    logger.info("OpenAI-compatible API at http://%s:%d/v1 (health: /health, metrics: "
                "/metrics, dashboard: /dashboard)", host, args.port)
    try:
        server.run(sockets=sockets)
    finally:
        gc.unfreeze()  # collectable again once stopped (matters where the process goes on)
    if not server.started:
        logger.error("The server could not start (is port %d free?).", args.port)
        return 1
    return 0


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other API server processes bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _api_server_process(args: argparse.Namespace, engine_config: Any, addresses: Any,
                        core_pid: int, index: int, interval: float) -> None:
    """One of N API server processes: an AsyncLLM on the shared core, uvicorn on the port."""
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.engine.core_proc import die_with_parent

    die_with_parent()
    configure_logging(args.log_level)
    try:
        sock = _reuse_port_socket(args.host, args.port)
        engine = AsyncLLM(engine_config, log_stats_interval=interval, client_index=index,
                          core_addresses=addresses, core_pid=core_pid)
    except (OSError, ValueError, RuntimeError) as e:
        logger.error("API server %d cannot start: %s", index, e)
        sys.exit(1)
    try:
        sys.exit(_serve(engine, args, sockets=[sock]))
    finally:
        engine.shutdown()


def _run_api_servers(args: argparse.Namespace, engine_config: Any, count: int,
                     interval: float) -> int:
    """Start the engine core and `count` API server processes; stop all when one ends or
    a signal comes."""
    import multiprocessing
    from multiprocessing.connection import wait

    from pagedllm.engine.core_client import CoreClient, start_core_process

    try:  # the port must be free (this socket is closed before the servers bind theirs)
        _reuse_port_socket(args.host, args.port).close()
    except OSError as e:
        logger.error("Cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    core = start_core_process(engine_config, num_clients=count + 1)
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    servers: list[multiprocessing.process.BaseProcess] = []
    code = 0
    try:
        probe = CoreClient(core.addresses, count, core)  # waits for the model to load
        try:
            probe.wait_ready()
        finally:
            probe.close()
        ctx = multiprocessing.get_context("spawn")
        for index in range(count):
            proc = ctx.Process(target=_api_server_process, name=f"pagedllm-api-{index}",
                               args=(args, engine_config, core.addresses, core.pid, index,
                                     interval))
            proc.start()
            servers.append(proc)
        logger.info("Started %d API server processes on port %d.", count, args.port)
        sentinels = [p.sentinel for p in servers] + [core.process.sentinel]
        while not stopping.is_set():
            if wait(sentinels, timeout=0.5):
                gone = [p.name for p in [*servers, core.process] if not p.is_alive()]
                logger.error("%s stopped; shutting the server down.", ", ".join(gone))
                code = 1
                break
    except (ValueError, RuntimeError) as e:
        logger.error("Cannot start the engine: %s", e)
        code = 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in servers:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: each drains its streams and exits
        for proc in servers:
            proc.join(GRACEFUL_SHUTDOWN_S + 10)
            if proc.is_alive():
                proc.kill()
        logger.info("Shutting down the engine.")
        core.shutdown()
        logger.info("Server stopped.")
    return code


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
