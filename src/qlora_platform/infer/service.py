"""The generation service behind `qlora serve`, callable without HTTP: admit, prepare, run and answer.

    service = GenerationService(ServerSettings(model="m"), loader=load_for_inference)
    service.load()                                        # blocking; the server runs it in a thread
    body = await service.complete("chat", {"messages": [...]})        # the OpenAI-shaped JSON body
    chunks = await service.stream("completion", {"prompt": "Once"})   # a bad request raises here
    async for sse in chunks: ...                          # "data: {...}\\n\\n" strings, then "data: [DONE]"

A request is one of three kinds: "chat" (/v1/chat/completions), "completion"
(/v1/completions) and "generate" (/generate); it comes as its pydantic model or as a
plain dict, validated here. Whatever the client got wrong is an `ApiError` (status,
message naming the field, code), which the HTTP layer turns into the OpenAI error
envelope. Prompts are tokenized in the request's worker thread once the scheduler has
admitted it, never on the event loop. `ServerState` holds the model (loaded once, in
the background), the scheduler and the metrics.

A chat request that declares tools (and does not set tool_choice "none") is prompted with
the tool schemas as training renders them, and its answer is read back for calls
(`ToolPlan`): calls that parse and fit their schemas come back as OpenAI `tool_calls`
with finish_reason "tool_calls"; an answer whose calls do not parse or fit comes back
as plain content with the reason in the choice's `tool_call_error` field. With
tool_choice "required" or a named function and a chat template that does not render
tools itself, the prompt ends with the opening of a call in the platform's format, so
the model has to call.

With `serve --rag INDEX` (settings.grounding), a chat request and a chat-shaped /generate
request are grounded: passages retrieved for the last user message go into its prompt
within the context, and the answer carries them as `sources` (in the JSON body; in a stream,
in the first chat chunk or in /generate's closing event), a field OpenAI clients ignore. A
request with `"rag": false` is answered without retrieval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from ..data.tools import CALL_CLOSE
from ..errors import UserError
from ..rag.prompt import question_of
from .auth import ApiKeys
from .generation import single_turn
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, GenerateRequest
from .scheduler import Job, QueueTimeout, Scheduler
from .tools import HeldText, ToolAnswer, ToolPlan

if TYPE_CHECKING:
    from .load import Loaded

log = logging.getLogger("qlora.serve")
Kind = Literal["chat", "completion", "generate"]
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
    grounding: Any = None  # rag.prompt.Grounding: chat and /generate answers grounded in an index


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = {"Retry-After": str(retry_after)} if retry_after else None


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The message and code of a refused body, naming the first field at fault (pydantic's errors)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", "invalid_json"
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "missing" and not loc:
        return "the request needs a JSON body", "invalid_request"
    return (f"{loc}: {msg}" if loc else msg), "invalid_request"


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

    @property
    def status(self) -> str:
        return "ok" if self.loaded is not None else "error" if self.load_error else "loading"

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


def _in_band_error(message: str, type_: str, code: str) -> str:
    """An error reported inside a stream that has begun (its status line is already sent)."""
    return _sse({"error": {"message": message, "type": type_, "code": code}})


class ChatRender:
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"
    final_delta: dict | str = {}

    def __init__(self, model: str):
        self.model, self.created = model, int(time.time())

    def _chunk(self, rid, delta, finish=None, extra: dict | None = None, sources: list | None = None) -> str:
        chunk = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **(extra or {})}],
        }
        if sources is not None:
            chunk["sources"] = sources
        return _sse(chunk)

    def start(self, rid, sources: list | None = None):
        """The first chunk; with retrieval it carries the sources (a field OpenAI clients ignore)."""
        return self._chunk(rid, {"role": "assistant", "content": ""}, sources=sources)

    def piece(self, rid, text):
        return self._chunk(rid, {"content": text})

    def calls(self, rid, calls: list[dict]) -> str:
        """One chunk per call, each whole: its id, name and arguments (a JSON string)."""
        return "".join(self._chunk(rid, {"tool_calls": [{"index": i, **call}]}) for i, call in enumerate(calls))

    def end(self, rid, result, req, answer: ToolAnswer | None = None, sources: list | None = None):
        """The closing chunk(s). `sources` is taken by every renderer's `end`; a chat stream has sent
        them in its first chunk already, so here they are not repeated."""
        if answer is None:
            out = self._chunk(rid, self.final_delta, result.finish_reason)
        else:
            out = self._chunk(rid, self.final_delta, answer.finish_reason(result), answer.extra())
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

    def full(self, rid, result, answer: ToolAnswer | None = None):
        message: dict = {"role": "assistant", "content": result.text}
        choice: dict = {"index": 0, "message": message, "finish_reason": result.finish_reason}
        if answer is not None:
            message["content"] = answer.content
            if answer.calls:
                message["tool_calls"] = answer.calls
            choice.update(finish_reason=answer.finish_reason(result), **answer.extra())
        return {
            "id": rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(result),
        }


class CompletionRender(ChatRender):
    prefix, chunk_object, final_delta = "cmpl", "text_completion", ""

    def _chunk(self, rid, text, finish=None, extra: dict | None = None, sources: list | None = None) -> str:
        return _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }
        )

    def start(self, rid, sources: list | None = None):
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

    def __init__(self, model: str = ""):
        pass  # /generate's answers do not name the model

    def start(self, rid, sources: list | None = None):
        return ""

    def piece(self, rid, text):
        return _sse({"text": text})

    def end(self, rid, result, req, sources: list | None = None):
        done = {"done": True, "finish_reason": result.finish_reason, "usage": _usage(result)}
        return _sse(done if sources is None else {**done, "sources": sources})

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


def _encode_chat(engine, req: ChatRequest, answer_prefix: str = "") -> list[int]:
    """The chat prompt; the tool schemas are rendered unless tool_choice is "none" (tool turns in
    the history are rendered either way). `answer_prefix` opens the answer (a forced call)."""
    messages = req.template_messages()
    if req.tool_mode is None:
        return engine.encode_chat(messages)
    return engine.encode_chat(messages, tools=req.tools, answer_prefix=answer_prefix)


def _encode_completion(engine, req: CompletionRequest) -> list[int]:
    return engine.encode_text(req.prompt)


def _encode_generate(engine, req: GenerateRequest) -> list[int]:
    if req.chat:
        return engine.encode_chat(single_turn(req.prompt, req.system))
    return engine.encode_text(req.prompt)


@dataclass(frozen=True)
class KindSpec:
    """What differs between the three kinds of request: body, prompt, answer shape, metrics label."""

    request: type[BaseModel]
    encode: Callable[[Any, Any], list[int]]  # (engine, request) -> prompt ids, in the worker thread
    render: Callable[[str], Any]  # served model name -> renderer of the JSON body and the SSE chunks
    route: str  # the latency metric's label
    checks_model: bool  # the OpenAI routes refuse a `model` that is not the served one


KINDS: dict[str, KindSpec] = {
    "chat": KindSpec(ChatRequest, _encode_chat, ChatRender, "/v1/chat/completions", True),
    "completion": KindSpec(CompletionRequest, _encode_completion, CompletionRender, "/v1/completions", True),
    "generate": KindSpec(GenerateRequest, _encode_generate, GenerateRender, "/generate", False),
}


class InFlight:
    """One admitted generation: its job in the scheduler (submitted on construction, or a 429),
    the prompt and settings its worker prepares, and the answer as a JSON body or as SSE chunks."""

    def __init__(self, state: ServerState, spec: KindSpec, req, engine):
        self.state, self.spec, self.req, self.engine = state, spec, req, engine
        self.render = spec.render(state.name)
        self.tools = ToolPlan.of(req, engine) if isinstance(req, ChatRequest) else None
        self.sources: list[dict] | None = None  # the passages the prompt was grounded in (serve --rag)
        self.prompt: list[int] = []
        self.params = None
        self.first: float | None = None  # when the first piece of text came
        self.started = time.perf_counter()
        job = state.scheduler.submit(self._work, self._prepare)
        if job is None:
            s = state.scheduler
            raise ApiError(
                429,
                f"the server is busy ({s.active} generating, {s.waiting} waiting); retry later",
                "queue_full",
                retry_after=s.retry_after_s,
            )
        self.job: Job = job
        self.rid = f"{self.render.prefix}-{uuid.uuid4().hex[:24]}"
        self.events = job.events()

    # -- in the job's worker thread -------------------------------------------------------
    def _messages(self) -> list[dict] | None:
        """The conversation retrieval grounds, or None when this request is not grounded."""
        grounding, req = self.state.settings.grounding, self.req
        if grounding is None or not getattr(req, "rag", False):
            return None
        if isinstance(req, ChatRequest):
            return req.template_messages()
        if isinstance(req, GenerateRequest) and req.chat:
            return single_turn(req.prompt, req.system)
        return None

    def _grounded(self, messages: list[dict]) -> list[int]:
        """The prompt with the passages retrieved for its last user message, within the context."""
        grounding, settings = self.state.settings.grounding, self.state.settings
        try:
            passages = grounding.passages([question_of(messages)])[0]
        except Exception as err:  # noqa: BLE001 - a Chroma server that went away, among others
            log.exception("retrieval failed")
            raise ApiError(
                503,
                f"retrieval failed: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}",
                "retrieval_unavailable",
                retry_after=5,
            ) from None
        limit = min(self.engine.max_context, settings.max_model_len or self.engine.max_context)
        answer = self.req.max_completion_tokens or self.req.max_tokens or settings.default_max_tokens
        extra: dict = {}
        if isinstance(self.req, ChatRequest) and self.req.tool_mode is not None:
            extra = {"tools": self.req.tools, "answer_prefix": self.tools.prefix if self.tools else ""}
        with self.state.encode_lock:
            ids, used = grounding.prompt(self.engine, messages, answer, context=limit, passages=passages, **extra)
        self.sources = [p.as_dict(n) for n, p in enumerate(used, 1)]
        return ids

    def _prepare(self, job: Job) -> None:
        messages = self._messages()
        try:
            if messages is not None:
                prompt_ids = self._grounded(messages)
            else:
                with self.state.encode_lock:
                    if self.tools is not None and self.tools.prefix:
                        prompt_ids = _encode_chat(self.engine, self.req, self.tools.prefix)
                    else:
                        prompt_ids = self.spec.encode(self.engine, self.req)
        except UserError as err:
            raise ApiError(400, str(err), "invalid_messages") from None
        params = _params(self.engine, self.req, prompt_ids, self.state.settings)
        if self.tools is not None and self.tools.one_call:
            params.stop.append(CALL_CLOSE)  # the one call is whole: nothing after it is read
        self.params = params
        self.prompt = prompt_ids
        job.emit(_PREPARED)

    def _work(self, job: Job) -> None:
        result = self.engine.run(self.prompt, self.params, on_text=job.emit, cancelled=lambda: job.cancelled)
        job.emit(result)

    # -- on the event loop ----------------------------------------------------------------
    def cancel(self) -> None:
        self.job.cancel()

    def _account(self, result) -> None:
        m = self.state.metrics
        m.tokens.labels(kind="prompt").inc(result.prompt_tokens)
        m.tokens.labels(kind="completion").inc(result.completion_tokens)
        m.latency.labels(route=self.spec.route).observe(time.perf_counter() - self.started)
        if self.first is not None:
            m.ttft.observe(self.first - self.started)

    async def body(self) -> dict | None:
        """The whole answer as the API's JSON body; None when the generation was cancelled."""
        text, result = [], None
        try:
            async for item in self.events:
                if isinstance(item, str):
                    self.first = self.first or time.perf_counter()
                    text.append(item)
                elif item is not _PREPARED:
                    result = item
        except QueueTimeout as err:
            raise ApiError(503, f"{err}; retry later", "queue_timeout", retry_after=5) from None
        finally:
            cancelled = self.job.cancelled
            self.job.cancel()  # no-op when finished; stops the worker when the caller is cancelled
        if result is None or cancelled:  # the caller left: nobody reads an answer
            return None
        self._account(result)
        if self.tools is not None:
            body = self.render.full(self.rid, result, self._tool_answer(result))
        else:
            body = self.render.full(self.rid, result)
        if self.sources is not None:
            body["sources"] = self.sources
        return body

    async def prepared(self) -> bool:
        """Wait until the prompt is tokenized and the settings are checked, raising the request's
        ApiError (a plain 4xx, before any chunk); False when the job ended without starting."""
        try:
            if await self.events.__anext__() is not _PREPARED:
                raise RuntimeError("a generation job must report its preparation first")
        except StopAsyncIteration:
            return False
        except BaseException:
            self.job.cancel()
            raise
        return True

    async def chunks(self) -> AsyncIterator[str]:
        """The answer as SSE strings once `prepared`; errors from here on are reported in-band."""
        result = None
        held = HeldText(self.tools.prefix) if self.tools is not None else None
        try:
            yield self.render.start(self.rid, self.sources)
            async for item in self.events:
                if isinstance(item, str):
                    self.first = self.first or time.perf_counter()
                    text = held.push(item) if held is not None else item
                    if text:
                        yield self.render.piece(self.rid, text)
                else:
                    result = item
            if result is not None:
                self._account(result)
                if held is None:
                    yield self.render.end(self.rid, result, self.req, sources=self.sources)
                else:
                    yield self._tool_end(result, held)
        except QueueTimeout as err:
            yield _in_band_error(f"{err}; retry later", "service_unavailable", "queue_timeout")
        except Exception:  # noqa: BLE001 - the stream has begun: report in-band
            log.exception("generation failed")
            yield _in_band_error("internal server error; see the server log", "server_error", "internal_error")
        finally:
            self.job.cancel()  # no-op when finished; stops the worker when the client went away
        yield "data: [DONE]\n\n"

    def _tool_answer(self, result) -> ToolAnswer:
        assert self.tools is not None
        answer = self.tools.read(result.text)
        if answer.error:
            log.warning("%s: the answer's tool calls are returned as text: %s", self.rid, answer.error)
        return answer

    def _tool_end(self, result, held: HeldText) -> str:
        """The last chunks of a stream with tools: the held text (as content, or the text beside the
        calls), one chunk per call, then the finish reason (with `tool_call_error` when calls failed)."""
        answer = self._tool_answer(result)
        rest = held.rest(answer)
        out = self.render.piece(self.rid, rest) if rest else ""
        if answer.calls:
            out += self.render.calls(self.rid, answer.calls)
        return out + self.render.end(self.rid, result, self.req, answer)


async def _cancel_when_set(event: asyncio.Event, generation: InFlight) -> None:
    await event.wait()
    generation.cancel()


class GenerationService:
    """The state, the settings and the metrics of a server, and its answers to generation requests,
    with no HTTP in sight: what the routes of `infer.server` call."""

    def __init__(self, settings: ServerSettings, loader):
        self.state = ServerState(settings, loader)
        self.settings = settings
        self.metrics = self.state.metrics

    @property
    def name(self) -> str:
        return self.state.name

    def load(self) -> None:
        self.state.load()

    def status(self) -> dict:
        s, state = self.state.scheduler, self.state
        return {
            "status": state.status,
            "model": state.name,
            "adapter": self.settings.adapter,
            "base_model": self.settings.model,
            "device": getattr(state.loaded, "device", None),
            "load_error": state.load_error,
            "active": s.active,
            "waiting": s.waiting,
            "max_active": s.max_active,
            "max_queue": s.max_queue,
            "batch_rows_active": state.batch_rows(),
            "retrieval": self.settings.grounding.retriever.describe() if self.settings.grounding else None,
        }

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "qlora-platform"}],
        }

    def request(self, kind: Kind, req: BaseModel | Mapping[str, Any]) -> Any:
        """The request body as the kind's pydantic model; a dict is validated (ApiError 400 naming the field)."""
        spec = KINDS[kind]
        if isinstance(req, spec.request):
            return req
        if isinstance(req, BaseModel):
            raise TypeError(f"a {kind} request is a {spec.request.__name__}, not a {type(req).__name__}")
        try:
            return spec.request.model_validate(req)
        except ValidationError as err:
            message, code = validation_message(err.errors())
            raise ApiError(400, message, code) from None

    def start(self, kind: Kind, req: BaseModel | Mapping[str, Any]) -> InFlight:
        """Validate and admit a request: ApiError for a wrong model (404), no model (503) or a full queue (429)."""
        spec, valid = KINDS[kind], self.request(kind, req)
        if spec.checks_model:
            self.state.check_model(valid.model)
        return InFlight(self.state, spec, valid, self.state.engine())

    async def complete(
        self, kind: Kind, req: BaseModel | Mapping[str, Any], cancel: asyncio.Event | None = None
    ) -> dict | None:
        """The whole answer as the API's JSON body, or None when `cancel` was set before it was read
        (setting it stops the generation at its next token)."""
        generation = self.start(kind, req)
        watcher = asyncio.create_task(_cancel_when_set(cancel, generation)) if cancel is not None else None
        try:
            body = await generation.body()
        finally:
            if watcher is not None:
                watcher.cancel()
        return None if cancel is not None and cancel.is_set() else body

    async def stream(self, kind: Kind, req: BaseModel | Mapping[str, Any]) -> AsyncIterator[str] | None:
        """The answer as SSE strings, ending in `data: [DONE]`. Awaiting this admits and prepares the
        request, so a bad one raises its ApiError here, before any chunk; None when it ended unstarted.
        Closing the iterator early cancels the generation."""
        generation = self.start(kind, req)
        if not await generation.prepared():
            return None
        return generation.chunks()
