"""HTTP stage: ServeSettings + AsyncEngine in, the OpenAI-compatible FastAPI app (and `ds4f serve`'s process) out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from ds4f import __version__
from ds4f.server.args import ServeSettings
from ds4f.server.errors import OpenAIError, error_response, from_pydantic, install_error_handlers, parse_json_body
from ds4f.server.metrics import CONTENT_TYPE
from ds4f.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from ds4f.server.serving_chat import create_chat_completion, render_chat_request
from ds4f.server.serving_completion import create_completion
from ds4f.server.state import ChatBackend, ServerState

log = logging.getLogger("ds4f.server")
VLLM_API_VERSION = "0.33.0"  # the vLLM release whose API this server mirrors (tool-eval-bench probes /version)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON, refusing more than `max_bytes` (413) before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise OpenAIError(f"The request body is {declared} bytes; the limit is {max_bytes} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise OpenAIError(f"The request body exceeds the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    return parse_json_body(b"".join(chunks), request.headers.get("content-type"))


def validate(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise OpenAIError(f"The request body must be a JSON object, got {type(body).__name__}", 400,
                          err_type="Bad Request")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_pydantic(e) from None


def build_app(engine: Any, settings: ServeSettings, backend: ChatBackend | None = None) -> FastAPI:
    """The app for one engine; the engine is shut down with the app (lifespan)."""
    state = ServerState(engine, settings, backend or ChatBackend.default())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                await shutdown()

    app = FastAPI(title="ds4f", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    install_error_handlers(app)

    app.add_middleware(_Gate, state=state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = validate(ChatCompletionRequest, await read_json(request, settings.max_body_bytes))
        return await create_chat_completion(state, req, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = validate(CompletionRequest, await read_json(request, settings.max_body_bytes))
        return await create_completion(state, req, request)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": settings.model_root,
                 "parent": None, "max_model_len": state.max_model_len,
                 "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                                 "created": now, "allow_create_engine": False, "allow_sampling": True,
                                 "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                 "allow_fine_tuning": False, "organization": "*", "group": None,
                                 "is_blocking": False}]}
                for name in settings.served_model_names]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> Response:
        ok = bool(getattr(engine, "healthy", True)) and not state.draining
        return Response(status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> JSONResponse:
        stats = getattr(engine, "stats", None)
        fraction = stats().get("roofline_fraction") if stats is not None else None
        return JSONResponse({"version": VLLM_API_VERSION, "ds4f_version": __version__, "roofline_fraction": fraction})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await read_json(request, settings.max_body_bytes)
        if isinstance(body, dict) and "messages" in body:
            chat = validate(TokenizeChatRequest, body)
            state.check_model(chat.model)
            ids, _ = render_chat_request(state, chat)
            strs = chat.return_token_strs
        else:
            plain = validate(TokenizeCompletionRequest, body)
            state.check_model(plain.model)
            ids, strs = state.tokenizer.encode(plain.prompt), plain.return_token_strs
        token_strs = state.tokenizer.convert_ids_to_tokens(ids) if strs else None
        return JSONResponse({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                             "token_strs": token_strs})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = validate(DetokenizeRequest, await read_json(request, settings.max_body_bytes))
        state.check_model(req.model)
        state.check_token_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(req.tokens)})

    return app


class _Gate:
    """Pure ASGI (keeps `request.is_disconnected()` working): API key on /v1/*, 503 for POSTs while draining."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            err = self._check(scope)
            if err is not None:
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> OpenAIError | None:
        key = self.state.settings.api_key
        if key is not None and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {key}":
                why = "missing" if not auth else "wrong"
                return OpenAIError(f"Unauthorized: {why} API key; send the --api-key value as "
                                   "'Authorization: Bearer <key>'", 401)
        if self.state.draining and scope["method"] == "POST":
            return OpenAIError("The server is shutting down and accepts no new requests", 503,
                               headers={"Retry-After": "5"})
        return None


class GracefulServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains: new requests get 503, running ones get `shutdown_timeout`
    seconds to finish and are then aborted; a second signal exits at once. Exit status stays 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self.state.draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        state = self.state
        log.info("draining: %d request(s) in flight, up to %.0fs", state.active, state.settings.shutdown_timeout)
        try:
            await asyncio.wait_for(state.idle.wait(), timeout=state.settings.shutdown_timeout)
        except TimeoutError:
            log.warning("aborting %d request(s) still running after --shutdown-timeout", state.active)
            for rid in list(state.request_ids):
                await state.abort(rid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.idle.wait(), timeout=5.0)
        self.should_exit = True


def serve_app(app: FastAPI, settings: ServeSettings) -> int:
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    GracefulServer(config, app.state.server).run()
    return 0


def run_server(settings: ServeSettings, engine: Any = None, backend: ChatBackend | None = None) -> int:
    """`ds4f serve`: build the engine (unless given), serve until SIGTERM, return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if engine is None:
        from ds4f.distributed.rendezvous import RendezvousError

        try:
            config = settings.engine_config()
            from ds4f.tools.doctor import preflight

            if preflight(config):  # each problem was printed with its fix
                return 2
            if settings.headless:
                from ds4f.distributed.parallel import ParallelConfig
                from ds4f.distributed.worker import run_headless

                return run_headless(ParallelConfig.from_engine_config(config))
            from ds4f.engine.async_engine import AsyncEngine

            engine = AsyncEngine(config)
        except (ValueError, FileNotFoundError) as e:
            print(f"ds4f serve: error: {e}", file=sys.stderr)
            return 2
        except RendezvousError as e:
            print(f"ds4f serve: error: {e}", file=sys.stderr)
            return 1
    return serve_app(build_app(engine, settings, backend), settings)

