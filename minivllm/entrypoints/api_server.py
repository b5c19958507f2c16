"""The OpenAI-compatible HTTP server: `python -m minivllm serve --model DIR`.

    this process                                                      the engine process
    HTTP request ──> FastAPI route ──> OpenAIServing{Completion,Chat} ──> AsyncLLM ══ pipes ══> LLMEngine
       (uvicorn)     (pydantic body)   check, tokenize, SamplingParams   streams     (engine_core.py)
                                       start requests, stream deltas

The server is a thin layer: it parses and checks a request, hands it to `AsyncLLM`, and sends
what comes back. No engine logic lives in a handler. `serve_one` starts the engine in a process
of its own (`AsyncLLM.from_config`), so that HTTP work and engine steps do not share a GIL;
`build_app` also takes an `LLMEngine`, run in this process (the tests do that).
`--api-server-count N` runs N such frontend processes on one port in front of one engine
process; `frontends.run_server` is the entry point for either (frontends.py), and each frontend
serves as described here.

Routes: `GET /health` (200 while the engine runs, 503 once it is gone), `GET /metrics`
(Prometheus text), and under `/v1` (behind the API key when one is set): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`.

Shutdown (SIGTERM or Ctrl-C): the server stops accepting connections, lets the requests in flight
finish for up to `shutdown_timeout` seconds and aborts the rest, so every stream still ends
properly (finish_reason "abort", then `data: [DONE]`); then uvicorn closes the connections and
the app's lifespan stops `AsyncLLM`, which stops the engine process and waits for it. The
process exits 0, with no traceback, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import signal
import socket
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from minivllm.engine.llm_engine import LLMEngine
from minivllm.engine.tokenizer import load_tokenizer
from minivllm.entrypoints.async_llm import AsyncLLM
from minivllm.entrypoints.engine_core import EngineStartError
from minivllm.entrypoints.errors import OpenAIError, from_validation_error
from minivllm.entrypoints.metrics import ServerMetrics
from minivllm.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from minivllm.entrypoints.serving import ClientGone
from minivllm.entrypoints.serving_chat import OpenAIServingChat
from minivllm.entrypoints.serving_completion import OpenAIServingCompletion

logger = logging.getLogger("minivllm.serve")


def build_app(engine: LLMEngine | AsyncLLM, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`: an `AsyncLLM` (e.g. one with its own
    engine process, `AsyncLLM.from_config`), or an `LLMEngine`, then run in this process. The app
    owns the AsyncLLM from now on: its metrics take `on_output`, its lifespan shuts it down."""
    async_llm = engine if isinstance(engine, AsyncLLM) else AsyncLLM(engine)
    metrics = ServerMetrics(lambda: async_llm.state)
    async_llm.on_output = metrics.record

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await async_llm.shutdown()

    app = FastAPI(title="minivllm", lifespan=lifespan)
    app.state.engine = async_llm
    app.state.metrics = metrics
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)
    app.include_router(_open_routes(async_llm, metrics))
    app.include_router(_v1_routes(async_llm, model_name))
    return app


def _open_routes(async_llm: AsyncLLM, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if async_llm.is_running else 503)

    @router.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router


def _v1_routes(async_llm: AsyncLLM, model_name: str) -> APIRouter:
    router = APIRouter(prefix="/v1")
    model_dir = async_llm.config.model_config.model
    tokenizer = load_tokenizer(model_dir)
    completion = OpenAIServingCompletion(async_llm, model_name, tokenizer)
    chat = OpenAIServingChat(async_llm, model_name, tokenizer)
    card = ModelCard(id=model_name, root=model_dir, max_model_len=completion.max_model_len)

    @router.get("/models")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @router.post("/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await completion.create(request, raw)

    @router.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(request, raw)

    return router


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error JSON (see errors.py)."""

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(str(exc.detail), status=exc.status_code).response()

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return OpenAIError(f"internal server error: {type(exc).__name__}: {exc}", status=500).response()


class APIKeyMiddleware:
    """`Authorization: Bearer KEY` on every /v1 route, checked before the body is read, so a
    client without the key learns nothing else (not even whether its JSON was valid).

    A plain ASGI middleware: it looks at the headers and passes everything else through untouched
    (streams included).
    """

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = OpenAIError("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                    status=401, code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to (host, port), as uvicorn would bind it; an OSError that says why not.
    reuse_port: let other sockets bind the same address too (SO_REUSEPORT), for several frontends."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def serve_one(listener: socket.socket, engine_config, model_name: str, api_key: str | None,
              shutdown_timeout: float, log_level: str) -> int:
    """One frontend, the port held: load the model (engine process), then serve on `listener`.
    `frontends.run_server` is the entry point; it calls this for `api_server_count=1`."""
    async_llm, status = start_engine(lambda: AsyncLLM.from_config(engine_config))
    if status is not None:
        return status
    return serve_app(async_llm, model_name, api_key, shutdown_timeout, log_level, sockets=[listener])


def start_engine(start):
    """Run `start()`, which starts the engine process and loads the model, with SIGTERM acting as
    Ctrl-C meanwhile. Returns (what it returned, None), or (None, the exit status) when it was
    stopped while loading (0: a requested stop) or the engine failed to start (1, logged)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return start(), None
    except KeyboardInterrupt:  # the engine process was stopped with it
        logger.warning("stopped while loading the model")
        return None, 0
    except EngineStartError as err:
        logger.error("%s", err)
        return None, 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_app(async_llm: AsyncLLM, model_name: str, api_key: str | None, shutdown_timeout: float,
              log_level: str, sockets: list[socket.socket]) -> int:
    """Serve `async_llm` with uvicorn on listening `sockets` already bound, until SIGTERM or
    Ctrl-C; drain, then stop it. Returns the exit status."""
    import uvicorn

    app = build_app(async_llm, model_name, api_key)
    # uvicorn's own graceful timeout is the backstop: by then our drain has ended every request.
    host, port = sockets[0].getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 5)
    server = _drain_first(uvicorn.Server)(config)
    server.async_llm, server.drain_timeout = async_llm, shutdown_timeout
    # uvicorn handles SIGINT/SIGTERM while it serves. A signal that comes before it has taken them
    # over (a launcher stopping a frontend that is still starting) asks it to stop as soon as it
    # has started; one that uvicorn re-raises after its graceful shutdown asks for what is done.
    # Python's own handlers would turn either into a traceback or a non-zero exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
    # As in the engine process: what exists now (FastAPI, pydantic, the tokenizer, the libraries:
    # ~250k objects) lives as long as the process. Frozen out of the collector's sight, a full
    # collection no longer walks it while streams are served: one paused this process, its
    # event loop and its reader of the engine's pipe, for 120-160 ms (2-core CPU, token fountain).
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=sockets)
    finally:  # if uvicorn never started, the lifespan did not stop the engine
        if not async_llm.is_closed:
            asyncio.run(async_llm.shutdown())
    return 0 if server.started else 1


def _drain_first(server_class):
    """uvicorn's Server, whose shutdown first closes the listening sockets and drains the engine
    (`AsyncLLM.drain`): uvicorn alone would wait for the connections and then cut the streams
    that are still open, without a last chunk."""

    class DrainingServer(server_class):
        async def shutdown(self, sockets=None) -> None:
            for listener in self.servers:
                listener.close()
            await self.async_llm.drain(self.drain_timeout)
            await super().shutdown(sockets)

    return DrainingServer


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
