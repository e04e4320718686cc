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
body, read against a size limit and a deadline), then the routes. Prompts are
tokenized in the request's worker thread once the scheduler has admitted it, never on
the event loop. Load is bounded by `infer.scheduler` and, per connection, by uvicorn's
`limit_concurrency` (`--max-connections`). A client that disconnects cancels its
generation, streaming or not (the route listens for `http.disconnect` on the ASGI
receive channel); SIGTERM lets in-flight requests finish (uvicorn's graceful
shutdown, `--drain-timeout`) before exiting. The model loads in a background thread
so /health answers from the first second. docs/security.md states the security model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .auth import ApiKeys
from .generation import single_turn
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, GenerateRequest
from .scheduler import QueueTimeout, Scheduler

if TYPE_CHECKING:
    from .load import Loaded

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
_PREPARED = object()  # a job's first event: its prompt is tokenized and its settings are valid


@dataclass
class ServerSettings:
    adapter: str | None = None
    model: str | None = None
    device: str = "auto"
    served_name: str | None = None
    keys: ApiKeys = field(default_factory=lambda: ApiKeys([]))
    cors_origins: list[str] = field(default_factory=list)
    max_active: int = 1
    max_queue: int = 8
    queue_timeout: float = 60.0
    max_body_bytes: int = 1_000_000
    body_timeout: float = 10.0  # seconds to receive a whole request body
    default_max_tokens: int = 256
    max_model_len: int | None = None  # prompt + max_tokens; None: the model's context


def error_response(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "code": code or ERROR_TYPES.get(status, "error"),
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = {"Retry-After": str(retry_after)} if retry_after else None


def _validation_message(err: RequestValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", "invalid_json"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "missing" and not loc:
        return "the request needs a JSON body", "invalid_request"
    return (f"{loc}: {msg}" if loc else msg), "invalid_request"


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


class ServerState:
    def __init__(self, settings: ServerSettings, loader):
        self.settings, self.loader = settings, loader
        self.loaded: Loaded | None = None
        self.load_error: str | None = None
        self.scheduler = Scheduler(settings.max_active, settings.max_queue, settings.queue_timeout)
        self.metrics = ServerMetrics(self.scheduler, rows=self.batch_rows)
        # One of adapter and model is always set (the command line checks it).
        self.name: str = settings.served_name or settings.adapter or settings.model or ""
        self.encode_lock = threading.Lock()  # one tokenization at a time across worker threads

    def batch_rows(self) -> int:
        batcher = self.loaded.engine.batcher if self.loaded is not None else None
        return len(batcher.active) if batcher is not None else 0

    def load(self) -> None:
        try:
            loaded = self.loader(adapter=self.settings.adapter, model=self.settings.model, device=self.settings.device)
            self.loaded = loaded
            if loaded.device == "cuda" and self.settings.max_active > 1:
                # Concurrent requests share each decode step (continuous batching).
                loaded.engine.enable_batching(self.settings.max_active)
            log.info("model ready: %s", self.name)
        except UserError as err:
            self.load_error = str(err)
            log.error("model failed to load: %s", err)
        except Exception as err:  # noqa: BLE001 - reported by /status, the server stays up
            self.load_error = f"{type(err).__name__}: {err}"
            log.exception("model failed to load")

    def engine(self):
        if self.loaded is None:
            if self.load_error:
                raise ApiError(503, f"the model failed to load: {self.load_error}", "model_load_failed")
            raise ApiError(503, "the model is still loading; retry shortly", "model_loading", retry_after=5)
        return self.loaded.engine

    def check_model(self, requested: str | None) -> None:
        if requested and requested not in (self.name, "default"):
            raise ApiError(
                404,
                f"model '{requested}' is not served here; this server serves '{self.name}' (see GET /v1/models)",
                "model_not_found",
            )


def _params(engine, req, prompt_ids, settings: ServerSettings):
    """The request's SamplingParams, checked against the context and the server's --max-model-len."""
    limit = min(engine.max_context, settings.max_model_len or engine.max_context)
    where = (
        f"this server's limit of {limit} tokens (--max-model-len)"
        if limit < engine.max_context
        else f"the model's context of {limit} tokens"
    )
    room = limit - len(prompt_ids)
    if not req.explicit_max_tokens and room < 1:
        raise ApiError(
            400, f"the prompt has {len(prompt_ids)} tokens, which fills {where}; shorten it", "context_length_exceeded"
        )
    params = req.sampling(min(settings.default_max_tokens, room) if room > 0 else settings.default_max_tokens)
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise ApiError(
            400,
            f"max_tokens: the prompt has {len(prompt_ids)} tokens and max_tokens is "
            f"{params.max_new_tokens}: {len(prompt_ids) + params.max_new_tokens} is over {where}; "
            f"shorten the prompt or lower max_tokens",
            "context_length_exceeded",
        )
    try:
        return params.validate(limit, len(prompt_ids))
    except UserError as err:
        raise ApiError(400, str(err), "invalid_request") from None


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(settings: ServerSettings, loader=None, load_in_background: bool = True) -> FastAPI:
    from contextlib import asynccontextmanager

    from .load import load_for_inference

    state = ServerState(settings, loader or load_for_inference)

    @asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=state.load, name="qlora-load", daemon=True)
        thread.start()
        if not load_in_background:
            await asyncio.to_thread(thread.join)
        yield

    app = FastAPI(title="qlora-platform", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qlora = state
    # add_middleware puts each one outside those before: the gate first, CORS around it.
    app.add_middleware(
        Gate, keys=settings.keys, limit=settings.max_body_bytes, timeout=settings.body_timeout, metrics=state.metrics
    )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key"],
        )

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        if err.status in (429, 503):
            state.metrics.rejected.labels(reason=err.code or str(err.status)).inc()
        return error_response(err.status, err.message, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        message, code = _validation_message(err)
        return error_response(400, message, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return error_response(err.status_code, message)

    @app.exception_handler(Exception)
    async def _crash(request, err: Exception):
        log.exception("request failed")
        return error_response(500, "internal server error; see the server log", "internal_error")

    @app.get("/health")
    async def health():
        if state.loaded is not None:
            return {"status": "ok"}
        return JSONResponse(
            {"status": "error" if state.load_error else "loading"}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.get("/status")
    async def status():
        s, loaded = state.scheduler, state.loaded
        return {
            "status": "ok" if loaded is not None else "error" if state.load_error else "loading",
            "model": state.name,
            "adapter": settings.adapter,
            "base_model": settings.model,
            "device": getattr(loaded, "device", None),
            "load_error": state.load_error,
            "active": s.active,
            "waiting": s.waiting,
            "max_active": s.max_active,
            "max_queue": s.max_queue,
            "batch_rows_active": state.batch_rows(),
        }

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": state.name, "object": "model", "created": int(time.time()), "owned_by": "qlora-platform"}],
        }

    async def generation(request: Request, route: str, encode, req, render):
        """Admit, prepare, run and answer one generation. `encode(engine)` gives the prompt ids; it
        runs in the job's thread once the scheduler has admitted the request. `render` shapes
        the JSON of each API flavour."""
        engine = state.engine()
        prepared = {}

        def prepare(job):
            with state.encode_lock:
                try:
                    prompt_ids = encode(engine)
                except UserError as err:
                    raise ApiError(400, str(err), "invalid_messages") from None
            prepared["params"] = _params(engine, req, prompt_ids, settings)
            prepared["prompt"] = prompt_ids
            job.emit(_PREPARED)

        def work(job):
            result = engine.run(
                prepared["prompt"], prepared["params"], on_text=job.emit, cancelled=lambda: job.cancelled
            )
            job.emit(result)

        started = time.perf_counter()
        job = state.scheduler.submit(work, prepare)
        if job is None:
            raise ApiError(
                429,
                f"the server is busy ({state.scheduler.active} generating, "
                f"{state.scheduler.waiting} waiting); retry later",
                "queue_full",
                retry_after=state.scheduler.retry_after_s,
            )
        rid = f"{render.prefix}-{uuid.uuid4().hex[:24]}"
        first: list[float | None] = [None]  # when the first token came (set from the stream)

        def account(result):
            m = state.metrics
            m.tokens.labels(kind="prompt").inc(result.prompt_tokens)
            m.tokens.labels(kind="completion").inc(result.completion_tokens)
            m.latency.labels(route=route).observe(time.perf_counter() - started)
            if first[0] is not None:
                m.ttft.observe(first[0] - started)

        events = job.events()
        if not req.stream:
            watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
            text, result = [], None
            try:
                async for item in events:
                    if isinstance(item, str):
                        first[0] = first[0] or time.perf_counter()
                        text.append(item)
                    elif item is not _PREPARED:
                        result = item
            except QueueTimeout as err:
                raise ApiError(503, f"{err}; retry later", "queue_timeout", retry_after=5) from None
            finally:
                gone = watcher.done() and not watcher.cancelled()
                watcher.cancel()
                job.cancel()  # no-op when finished; stops the worker when this handler is cancelled
            if result is None or gone:  # the client left: nobody reads an answer
                return Response(status_code=499)
            account(result)
            return render.full(rid, result)

        try:  # errors of the request itself (bad prompt, too long) are still a plain 4xx
            if await events.__anext__() is not _PREPARED:
                raise RuntimeError("a generation job must report its preparation first")
        except StopAsyncIteration:
            return Response(status_code=499)
        except BaseException:
            job.cancel()
            raise

        async def stream():
            result = None
            try:
                yield render.start(rid)
                async for item in events:
                    if isinstance(item, str):
                        first[0] = first[0] or time.perf_counter()
                        yield render.piece(rid, item)
                    else:
                        result = item
                if result is not None:
                    account(result)
                    yield render.end(rid, result, req)
            except QueueTimeout as err:
                yield _sse(
                    {
                        "error": {
                            "message": f"{err}; retry later",
                            "type": "service_unavailable",
                            "code": "queue_timeout",
                        }
                    }
                )
            except Exception:  # noqa: BLE001 - the stream has begun: report in-band
                log.exception("generation failed")
                yield _sse(
                    {
                        "error": {
                            "message": "internal server error; see the server log",
                            "type": "server_error",
                            "code": "internal_error",
                        }
                    }
                )
            finally:
                job.cancel()  # no-op when finished; stops the worker when the client went away
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        state.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await generation(
            request, "/v1/chat/completions", lambda engine: engine.encode_chat(messages), req, ChatRender(state.name)
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        state.check_model(req.model)
        return await generation(
            request, "/v1/completions", lambda engine: engine.encode_text(req.prompt), req, CompletionRender(state.name)
        )

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        def encode(engine):
            if req.chat:
                return engine.encode_chat(single_turn(req.prompt, req.system))
            return engine.encode_text(req.prompt)

        return await generation(request, "/generate", encode, req, GenerateRender())

    return app


async def _cancel_on_disconnect(request: Request, job) -> None:
    """Cancel the job when the client disconnects: wait on the ASGI receive channel, where the
    server delivers `http.disconnect` (the body has been read, so nothing else arrives there)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


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


class ChatRender:
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"
    final_delta: dict | str = {}

    def __init__(self, model: str):
        self.model, self.created = model, int(time.time())

    def _chunk(self, rid, delta, finish=None) -> str:
        return _sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def start(self, rid):
        return self._chunk(rid, {"role": "assistant", "content": ""})

    def piece(self, rid, text):
        return self._chunk(rid, {"content": text})

    def end(self, rid, result, req):
        out = self._chunk(rid, self.final_delta, result.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            out += _sse(
                {
                    "id": rid,
                    "object": self.chunk_object,
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": _usage(result),
                }
            )
        return out

    def full(self, rid, result):
        return {
            "id": rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": _usage(result),
        }


class CompletionRender(ChatRender):
    prefix, chunk_object, final_delta = "cmpl", "text_completion", ""

    def _chunk(self, rid, text, finish=None) -> str:
        return _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }
        )

    def start(self, rid):
        return ""

    def piece(self, rid, text):
        return self._chunk(rid, text)

    def full(self, rid, result):
        return {
            "id": rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result),
        }


class GenerateRender:
    prefix = "gen"

    def start(self, rid):
        return ""

    def piece(self, rid, text):
        return _sse({"text": text})

    def end(self, rid, result, req):
        return _sse({"done": True, "finish_reason": result.finish_reason, "usage": _usage(result)})

    def full(self, rid, result):
        return {
            "id": rid,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": _usage(result),
            "timings": {
                "time_to_first_token_s": round(result.prefill_s, 4),
                "decode_s": round(result.decode_s, 4),
                "decode_tokens_per_s": round(result.decode_tokens_per_s, 1),
            },
        }
