"""`qlora serve`: an OpenAI-compatible HTTP API over the generation engine (FastAPI + uvicorn).

    qlora serve --adapter runs/demo/final_adapter --port 8000 --api-key "$KEY"

Routes: GET /health (public: 503 while the model loads, 200 when ready),
POST /generate, POST /v1/chat/completions, POST /v1/completions (plain JSON or
SSE streaming ending in `data: [DONE]`), GET /v1/models, GET /metrics (Prometheus).
Every error, from a bad key to a malformed body, is the OpenAI envelope
`{"error": {"message", "type", "code"}}`. Load is bounded by `infer.scheduler`;
a client that disconnects cancels its generation; SIGTERM lets in-flight
requests finish (uvicorn's graceful shutdown, `--drain-timeout`) before exiting.
The model loads in a background thread so /health answers from the first second.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .auth import ApiKeys
from .engine import single_turn
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, GenerateRequest
from .scheduler import QueueTimeout, Scheduler

log = logging.getLogger("qlora.serve")
PUBLIC_PATHS = {"/health"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


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
    default_max_tokens: int = 256


def error_response(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "code": code or ERROR_TYPES.get(status, "error")}}
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


class BodyLimit:
    """Refuse bodies over the limit with 413 before anything parses them, Content-Length or not."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is over the server's limit of {self.limit} bytes",
                                 "body_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, for cancel-on-disconnect

        return await self.app(scope, replay, send)


class ServerState:
    def __init__(self, settings: ServerSettings, loader):
        self.settings, self.loader = settings, loader
        self.loaded = None
        self.load_error: str | None = None
        self.scheduler = Scheduler(settings.max_active, settings.max_queue, settings.queue_timeout)
        self.metrics = ServerMetrics(self.scheduler)
        self.name = settings.served_name or settings.adapter or settings.model

    def load(self) -> None:
        try:
            self.loaded = self.loader(adapter=self.settings.adapter, model=self.settings.model,
                                      device=self.settings.device)
            if self.loaded.device == "cuda" and self.settings.max_active > 1:
                # Concurrent requests share each decode step (continuous batching).
                self.loaded.engine.enable_batching(self.settings.max_active)
            log.info("model ready: %s", self.name)
        except UserError as err:
            self.load_error = str(err)
            log.error("model failed to load: %s", err)
        except Exception as err:  # noqa: BLE001 - reported by /health, the server stays up
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
            raise ApiError(404, f"model '{requested}' is not served here; this server serves '{self.name}' "
                                f"(see GET /v1/models)", "model_not_found")


def _params(engine, req, prompt_ids, default_max_tokens):
    room = engine.max_context - len(prompt_ids)
    if not req.explicit_max_tokens and room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, which fills the model's context of "
                            f"{engine.max_context} tokens; shorten it", "context_length_exceeded")
    params = req.sampling(min(default_max_tokens, room) if room > 0 else default_max_tokens)
    try:
        return params.validate(engine.max_context, len(prompt_ids))
    except UserError as err:
        code = "context_length_exceeded" if "context" in str(err) else "invalid_request"
        raise ApiError(400, str(err), code) from None


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


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
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"])

    @app.middleware("http")
    async def keys_and_counts(request: Request, call_next):
        route = request.url.path
        if route not in PUBLIC_PATHS and request.method != "OPTIONS" and not settings.keys.allows(request.headers):
            given = ApiKeys.presented(request.headers)
            response = error_response(401, "invalid API key" if given else
                                      "an API key is required: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'",
                                      "invalid_api_key")
        else:
            try:
                response = await call_next(request)
            except ApiError as err:
                response = error_response(err.status, err.message, err.code, err.headers)
        known = route if route in ("/health", "/generate", "/metrics", "/v1/models", "/v1/chat/completions",
                                   "/v1/completions") else "other"
        state.metrics.requests.labels(route=known, status=str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

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
        s = state.scheduler
        if state.loaded is not None:
            return {"status": "ok", "model": state.name, "active": s.active, "waiting": s.waiting}
        status = "error" if state.load_error else "loading"
        body = {"status": status, "model": state.name}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "qlora-platform"}]}

    async def generation(request: Request, route: str, prompt_ids: list[int], req, render):
        """Admit, run and answer one generation; `render` shapes the JSON of each API flavour."""
        engine = state.engine()
        params = _params(engine, req, prompt_ids, settings.default_max_tokens)

        def work(job):
            result = engine.run(prompt_ids, params, on_text=job.emit, cancelled=lambda: job.cancelled)
            job.emit(result)

        started = time.perf_counter()
        job = state.scheduler.submit(work)
        if job is None:
            raise ApiError(429, f"the server is busy ({state.scheduler.active} generating, "
                                f"{state.scheduler.waiting} waiting); retry later", "queue_full",
                           retry_after=state.scheduler.retry_after_s)
        rid = f"{render.prefix}-{uuid.uuid4().hex[:24]}"
        first = [None]

        def account(result):
            m = state.metrics
            m.tokens.labels(kind="prompt").inc(result.prompt_tokens)
            m.tokens.labels(kind="completion").inc(result.completion_tokens)
            m.latency.labels(route=route).observe(time.perf_counter() - started)
            if first[0] is not None:
                m.ttft.observe(first[0] - started)

        if not req.stream:
            watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
            text, result = [], None
            try:
                async for item in job.events():
                    if isinstance(item, str):
                        first[0] = first[0] or time.perf_counter()
                        text.append(item)
                    else:
                        result = item
            except QueueTimeout as err:
                raise ApiError(503, f"{err}; retry later", "queue_timeout", retry_after=5) from None
            finally:
                watcher.cancel()
            if result is None:  # cancelled before it ran: the client is gone
                return Response(status_code=499)
            account(result)
            return render.full(rid, result)

        async def events():
            result = None
            try:
                yield render.start(rid)
                async for item in job.events():
                    if isinstance(item, str):
                        first[0] = first[0] or time.perf_counter()
                        yield render.piece(rid, item)
                    else:
                        result = item
                if result is not None:
                    account(result)
                    yield render.end(rid, result, req)
            except QueueTimeout as err:
                yield _sse({"error": {"message": f"{err}; retry later", "type": "service_unavailable",
                                      "code": "queue_timeout"}})
            except Exception:  # noqa: BLE001 - the stream has begun: report in-band
                log.exception("generation failed")
                yield _sse({"error": {"message": "internal server error; see the server log",
                                      "type": "server_error", "code": "internal_error"}})
            finally:
                job.cancel()  # no-op when finished; stops the worker when the client went away
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        state.check_model(req.model)
        engine = state.engine()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = engine.encode_chat(messages)
        except UserError as err:
            raise ApiError(400, str(err), "invalid_messages") from None
        return await generation(request, "/v1/chat/completions", prompt_ids, req, ChatRender(state.name))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        state.check_model(req.model)
        engine = state.engine()
        return await generation(request, "/v1/completions", engine.encode_text(req.prompt), req,
                                CompletionRender(state.name))

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        engine = state.engine()
        if req.chat:
            prompt_ids = engine.encode_chat(single_turn(req.prompt, req.system))
        else:
            prompt_ids = engine.encode_text(req.prompt)
        return await generation(request, "/generate", prompt_ids, req, GenerateRender())

    return app


async def _cancel_on_disconnect(request: Request, job) -> None:
    while True:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.25)


class ChatRender:
    prefix, chunk_object, final_delta = "chatcmpl", "chat.completion.chunk", {}

    def __init__(self, model: str):
        self.model, self.created = model, int(time.time())

    def _chunk(self, rid, delta, finish=None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def start(self, rid):
        return self._chunk(rid, {"role": "assistant", "content": ""})

    def piece(self, rid, text):
        return self._chunk(rid, {"content": text})

    def end(self, rid, result, req):
        out = self._chunk(rid, self.final_delta, result.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            out += _sse({"id": rid, "object": self.chunk_object, "created": self.created, "model": self.model,
                         "choices": [], "usage": _usage(result)})
        return out

    def full(self, rid, result):
        return {"id": rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}], "usage": _usage(result)}


class CompletionRender(ChatRender):
    prefix, chunk_object, final_delta = "cmpl", "text_completion", ""

    def _chunk(self, rid, text, finish=None) -> str:
        return _sse({"id": rid, "object": "text_completion", "created": self.created, "model": self.model,
                     "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})

    def start(self, rid):
        return ""

    def piece(self, rid, text):
        return self._chunk(rid, text)

    def full(self, rid, result):
        return {"id": rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                             "logprobs": None}], "usage": _usage(result)}


class GenerateRender:
    prefix = "gen"

    def start(self, rid):
        return ""

    def piece(self, rid, text):
        return _sse({"text": text})

    def end(self, rid, result, req):
        return _sse({"done": True, "finish_reason": result.finish_reason, "usage": _usage(result)})

    def full(self, rid, result):
        return {"id": rid, "text": result.text, "finish_reason": result.finish_reason, "usage": _usage(result),
                "timings": {"time_to_first_token_s": round(result.prefill_s, 4),
                            "decode_s": round(result.decode_s, 4),
                            "decode_tokens_per_s": round(result.decode_tokens_per_s, 1)}}
