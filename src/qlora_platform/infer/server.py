"""`qlora serve`: an OpenAI-compatible HTTP API over the generation engine (FastAPI + uvicorn).

    qlora serve --adapter runs/demo/final_adapter --port 8000 --api-key-file keys.txt

Routes: GET /health (public, minimal: `{"status": ...}`, 503 while the model loads
or when it failed, 200 when ready), GET /status (keyed: model, adapter, load error,
load), POST /generate, POST /v1/chat/completions, POST /v1/completions (plain JSON or
SSE streaming ending in `data: [DONE]`), GET /v1/models, GET /metrics (Prometheus).
Every error, from a bad key to a malformed body, is the OpenAI envelope
`{"error": {"message", "type", "code"}}`.

Each request passes, outermost first: CORS (so 401 and 413 carry its headers too),
the gate (`Gate`: the API key, checked before a byte of the body is read, then the
body, read against a size limit and a deadline), then the routes. The routes (`router`,
a FastAPI APIRouter) only translate HTTP into calls of `GenerationService`
(`infer.service`), which validates, admits, prepares and answers generations and is
callable without HTTP; `create_app` wires the service, the error handlers, the router
and the middleware together. Load is bounded by `infer.scheduler` and, per connection, by uvicorn's
`limit_concurrency` (`--max-connections`). A client that disconnects cancels its
generation, streaming or not (the route listens for `http.disconnect` on the ASGI
receive channel); SIGTERM lets in-flight requests finish (uvicorn's graceful
shutdown, `--drain-timeout`) before exiting. The model loads in a background thread
so /health answers from the first second. docs/security.md states the security model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import ApiKeys
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, GenerateRequest
from .service import ApiError, GenerationService, Kind, ServerSettings, ServerState, validation_message

__all__ = ["ApiError", "Gate", "ServerSettings", "ServerState", "create_app", "router", "serve", "uvicorn_config"]

log = logging.getLogger("qlora.serve")
PUBLIC_PATHS = {"/health"}
ROUTES = ("/health", "/status", "/generate", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
CLOSE = {"Connection": "close"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "code": code or ERROR_TYPES.get(status, "error"),
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """Pure ASGI middleware (no BaseHTTPMiddleware, which hides `http.disconnect` from the routes):
    counts every response by route and status; refuses a request without a valid key (401)
    before reading its body; reads the body whole, refusing one over `limit` bytes (413,
    Content-Length or not) or one that has not arrived within `timeout` seconds (408), and
    replays it to the app, whose later receives then see the client's disconnect. Its own
    refusals close the connection: whatever the client still sends is not read."""

    def __init__(self, app, keys: ApiKeys, limit: int, timeout: float, metrics: ServerMetrics):
        self.app, self.keys, self.limit, self.timeout, self.metrics = app, keys, limit, timeout, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [0]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._gate(scope, receive, counted)
        finally:
            self.metrics.requests.labels(route=route, status=str(status[0] or 499)).inc()

    async def _gate(self, scope, receive, send):
        headers = Headers(scope=scope)
        if scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS" and not self.keys.allows(headers):
            given = ApiKeys.presented(headers)
            response = error_response(
                401,
                "invalid API key"
                if given
                else "an API key is required: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'",
                "invalid_api_key",
                CLOSE,
            )
            return await response(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._too_big(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            response = error_response(
                408,
                f"the request body did not arrive within {self.timeout:g} s; send it whole and promptly",
                "body_timeout",
                CLOSE,
            )
            return await response(scope, receive, send)
        if body is None:
            return  # the client left before sending its body
        if len(body) > self.limit:
            return await self._too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: http.disconnect, for cancel-on-disconnect

        return await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body; stops early (returning what is there) once it is over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit or not message.get("more_body"):
                return b"".join(chunks)

    async def _too_big(self, scope, receive, send):
        response = error_response(
            413, f"the request body is over the server's limit of {self.limit} bytes", "body_too_large", CLOSE
        )
        return await response(scope, receive, send)


# -- the routes: HTTP in, service calls, HTTP out ---------------------------------------------


async def _service(request: Request) -> GenerationService:
    return request.app.state.service  # a coroutine, so FastAPI does not hop to a thread for it


Service = Annotated[GenerationService, Depends(_service)]
router = APIRouter()


@router.get("/health")
async def health(service: Service):
    if service.state.status == "ok":
        return {"status": "ok"}
    return JSONResponse({"status": service.state.status}, status_code=503, headers={"Retry-After": "5"})


@router.get("/status")
async def status(service: Service):
    return service.status()


@router.get("/metrics")
async def metrics(service: Service):
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


@router.get("/v1/models")
async def models(service: Service):
    return service.models()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, service: Service):
    return await _generation(request, service, "chat", req)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, service: Service):
    return await _generation(request, service, "completion", req)


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request, service: Service):
    return await _generation(request, service, "generate", req)


async def _generation(request: Request, service: GenerationService, kind: Kind, req):
    """One generation over HTTP: SSE when the body asks to stream, else the JSON body. A plain
    answer is cancelled when the client disconnects (499); a stream, when its response is closed."""
    if req.stream:
        chunks = await service.stream(kind, req)
        if chunks is None:
            return Response(status_code=499)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    left = asyncio.Event()
    watcher = asyncio.create_task(_cancel_on_disconnect(request, left))
    try:
        body = await service.complete(kind, req, cancel=left)
    finally:
        watcher.cancel()
    return Response(status_code=499) if body is None else body


async def _cancel_on_disconnect(request: Request, left: asyncio.Event) -> None:
    """Set `left` when the client disconnects: wait on the ASGI receive channel, where the server
    delivers `http.disconnect` (the body has been read, so nothing else arrives there)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            left.set()
            return


# -- the application ---------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: FastAPI, service: GenerationService, wait: bool):
    """Load the model in a background thread, so /health answers from the first second; `wait`: before serving."""
    thread = threading.Thread(target=service.load, name="qlora-load", daemon=True)
    thread.start()
    if wait:
        await asyncio.to_thread(thread.join)
    yield


async def _api_error(request: Request, err: ApiError):
    if err.status in (429, 503):
        request.app.state.service.metrics.rejected.labels(reason=err.code or str(err.status)).inc()
    return error_response(err.status, err.message, err.code, err.headers)


async def _invalid(request: Request, err: RequestValidationError):
    message, code = validation_message(err.errors())
    return error_response(400, message, code)


async def _http(request: Request, err: StarletteHTTPException):
    message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
    return error_response(err.status_code, message)


async def _crash(request: Request, err: Exception):
    log.exception("request failed")
    return error_response(500, "internal server error; see the server log", "internal_error")


def create_app(settings: ServerSettings, loader=None, load_in_background: bool = True) -> FastAPI:
    from .load import load_for_inference

    service = GenerationService(settings, loader or load_for_inference)
    lifespan = functools.partial(_lifespan, service=service, wait=not load_in_background)
    app = FastAPI(title="qlora-platform", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.qlora = service, service.state
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(StarletteHTTPException)(_http)
    app.exception_handler(Exception)(_crash)
    app.include_router(router)
    # add_middleware puts each one outside those before: the gate first, CORS around it.
    app.add_middleware(
        Gate, keys=settings.keys, limit=settings.max_body_bytes, timeout=settings.body_timeout, metrics=service.metrics
    )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key"],
        )
    return app


def uvicorn_config(
    app,
    host: str,
    port: int,
    drain_timeout: float = 30.0,
    log_level: str = "info",
    access_log: bool = False,
    max_connections: int = 128,
):
    """uvicorn's settings for the app: connections beyond `max_connections` are answered 503 at
    once, idle keep-alive connections close after 5 s, the access log is on only when asked."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout,  # type: ignore[arg-type]  # uvicorn waits on a float as well
        access_log=access_log,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
    )


def serve(
    settings: ServerSettings,
    host: str,
    port: int,
    drain_timeout: float,
    log_level: str = "info",
    access_log: bool = False,
    max_connections: int = 128,
) -> int:
    import uvicorn

    from .chat import is_loopback

    if not is_loopback(host) and not settings.keys.enabled:
        print(
            f"warning: serving on {host} with no API key: anyone who can reach this port can use the model; "
            f"set --api-key-file or $QLORA_API_KEYS",
            file=sys.stderr,
        )
    app = create_app(settings)
    config = uvicorn_config(app, host, port, drain_timeout, log_level, access_log, max_connections)
    print(
        f"serving {settings.served_name or settings.adapter or settings.model} on http://{host}:{port} "
        f"({'keys required' if settings.keys.enabled else 'no keys'}, at most {max_connections} connections); "
        f"/health turns 200 when the model is loaded",
        file=sys.stderr,
    )
    uvicorn.Server(config).run()
    return 0
