"""Request bodies of the HTTP API (OpenAI-compatible plus the plan's /generate), validated at the edge.

    req = ChatRequest.model_validate(body)      # pydantic: types and ranges
    params = req.sampling(default_max_tokens)   # -> SamplingParams

Everything a client can get wrong is caught here or in `SamplingParams.validate`
(which also checks prompt + max_tokens against the context) before the model
sees the request. Unknown fields are accepted and ignored, as OpenAI's server
does for fields it does not use, except those whose silent ignoring would
change results (n > 1, logprobs, logit_bias, non-zero presence or frequency
penalties, a response_format other than text, echo, suffix, best_of > 1, `tools`
outside chat, the legacy `functions`), which are refused clearly. A chat request
may declare `tools` (JSON schemas, checked by `data.tools.normalise_tools`) and
choose how they are used (`tool_choice`); its history may hold assistant
`tool_calls` and the `tool` messages that answer them, linked by id as OpenAI
links them. Numbers are bounded so that no value can break the
sampler: a temperature below `MIN_TEMPERATURE` is greedy (dividing by it would
overflow the logits), penalties and seeds have finite ranges. Text that is not
valid Unicode (a lone surrogate from a `\\ud800` JSON escape) is refused here
rather than failing in the tokenizer.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.tools import normalise_tools
from ..errors import UserError
from .sampling import MIN_REPETITION_PENALTY, MIN_TEMPERATURE, SEED_RANGE, SamplingParams


def valid_unicode(value: str) -> str:
    """The text unchanged, or a ValueError when it holds a lone surrogate (not encodable as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {err.start}); send UTF-8 text") from None
    return value


def valid_unicode_tree(value: Any, place: str) -> None:
    """A ValueError naming the place of the first string in a JSON value that is not valid Unicode."""
    if isinstance(value, str):
        try:
            valid_unicode(value)
        except ValueError as err:
            raise ValueError(f"{place}: {err}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            valid_unicode_tree(key, place)
            valid_unicode_tree(item, f"{place}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            valid_unicode_tree(item, f"{place}.{i}")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _unicode(cls, value):
        return valid_unicode(value)


class ToolCallFunction(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)  # sent as a JSON object in a string (OpenAI)

    @field_validator("arguments", mode="before")
    @classmethod
    def _json_object(cls, value):
        if not isinstance(value, str):
            return value  # an object is taken as it is; anything else fails the type check
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"is not JSON ({err.msg}); send the arguments as a JSON object in a string") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"must be a JSON object, got {type(parsed).__name__}")
        return parsed

    @field_validator("arguments")
    @classmethod
    def _unicode_arguments(cls, value):
        valid_unicode_tree(value, "arguments")
        return value

    @field_validator("name")
    @classmethod
    def _unicode(cls, value):
        return valid_unicode(value)


class ToolCall(BaseModel):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: ToolCallFunction

    @field_validator("id")
    @classmethod
    def _unicode(cls, value):
        return valid_unicode(value)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", "name", "tool_call_id")
    @classmethod
    def _unicode(cls, value):
        return valid_unicode(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                f"a {self.role} message needs content (null only for an assistant message with tool_calls)"
            )
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot hold tool_calls; only an assistant message can")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self, call_names: dict[str, str]) -> dict:
        """The message as `engine.encode_chat` takes it (arguments as objects); `call_names` maps
        call ids to function names, for tool messages that do not repeat the name."""
        if self.role == "tool":
            name = self.name or call_names.get(self.tool_call_id or "", "")
            return {"role": "tool", "tool_call_id": self.tool_call_id, "name": name, "content": self.text()}
        out: dict = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": c.function.model_dump()} for c in self.tool_calls
            ]
        return out


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    function_call: Any = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1, description="one choice per request")
    takes_tools: ClassVar[bool] = False  # only chat requests declare tools

    @field_validator("model")
    @classmethod
    def _model_unicode(cls, value):
        return valid_unicode(value) if value is not None else value

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, value):
        return 0.0 if value < MIN_TEMPERATURE else value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return [valid_unicode(s) for s in stops]

    @field_validator("logprobs", "top_logprobs", "echo", "suffix", "logit_bias")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_functions(cls, value):
        if value:
            raise ValueError("is OpenAI's retired function-calling API; send tools (and tool_choice) instead")
        return value

    @field_validator("tools")
    @classmethod
    def _tools_in_chat_only(cls, value):
        if value and not cls.takes_tools:
            raise ValueError("are taken by /v1/chat/completions only; send the request there, with messages")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value, info):
        if value:
            raise ValueError(
                f"{info.field_name} is not supported by this server; leave it 0 "
                f"(repetition_penalty is: 1.0 is off, 1.1 a mild penalty)"
            )
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and value.get("type", "text") != "text":
            raise ValueError(f"type '{value.get('type')}' is not supported by this server; only 'text' is")
        return value

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return SamplingParams(
            max_new_tokens=limit,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=list(self.stop or []),
            seed=self.seed,
        )

    @property
    def explicit_max_tokens(self) -> bool:
        return bool(self.max_completion_tokens or self.max_tokens)


RAG_FIELD = Field(True, description="ground the answer in the server's index (serve --rag); false skips retrieval")


class ChatRequest(_Sampling):
    takes_tools: ClassVar[bool] = True
    messages: list[Message] = Field(min_length=1)
    rag: bool = RAG_FIELD
    tool_choice: Any = None  # 'auto', 'none', 'required' or a named function
    parallel_tool_calls: bool = True

    @field_validator("messages")
    @classmethod
    def _some_text(cls, value):
        if not any(m.text().strip() for m in value if m.role == "user"):
            raise ValueError("needs at least one user message with text")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_shape(cls, value):
        if value is None or value in ("auto", "none", "required"):
            return value
        fn = value.get("function") if isinstance(value, dict) else None
        if not isinstance(fn, dict) or value.get("type") != "function" or not isinstance(fn.get("name"), str):
            raise ValueError(
                'must be \'auto\', \'none\', \'required\' or {"type": "function", "function": {"name": ...}}'
            )
        return value

    @model_validator(mode="after")
    def _tools_fit(self):
        """Tool schemas normalised (a bad one named by its place), tool_choice against them, and every
        call in the history answered by a tool message naming its id."""
        if self.tools:
            valid_unicode_tree(self.tools, "tools")
            try:
                self.tools = normalise_tools(self.tools, "request")
            except UserError as err:
                raise ValueError(str(err).removeprefix("request: ")) from None
        else:
            self.tools = None
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: there are no tools to choose from; declare them in tools or leave it out")
        name = self.forced_function
        if name is not None and name not in {t["function"]["name"] for t in self.tools or []}:
            declared = ", ".join(t["function"]["name"] for t in self.tools or [])
            raise ValueError(
                f"tool_choice: names function '{name}', which tools does not declare (declared: {declared})"
            )
        _check_tool_turns(self.messages)
        return self

    @property
    def forced_function(self) -> str | None:
        """The function `tool_choice` names, if it names one."""
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    @property
    def tool_mode(self) -> str | None:
        """How the declared tools are used: None (no tools, or tool_choice 'none'), 'auto', 'required',
        or 'function' (the one that `forced_function` names)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, dict):
            return "function"
        return self.tool_choice or "auto"

    def template_messages(self) -> list[dict]:
        """The messages as `engine.encode_chat` takes them."""
        names = {c.id: c.function.name for m in self.messages for c in m.tool_calls or []}
        return [m.for_template(names) for m in self.messages]


def _check_tool_turns(messages: list[Message]) -> None:
    """Each tool message answers a call of the assistant message before it (only tool messages
    between), and each call is answered before the next other message."""
    pending: dict[str, str] = {}
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in pending:
                waiting = ", ".join(pending) or "none"
                raise ValueError(
                    f"messages.{i}: tool_call_id '{m.tool_call_id}' answers no call of the assistant message "
                    f"before it (calls waiting for a result: {waiting})"
                )
            del pending[m.tool_call_id]
            continue
        if pending:
            raise ValueError(
                f"messages.{i}: call(s) {', '.join(pending)} have no tool message with their result; "
                f"answer each call with a tool message before the next message"
            )
        pending = {c.id: c.function.name for c in m.tool_calls or []}
        if len(pending) < len(m.tool_calls or []):
            raise ValueError(f"messages.{i}: two tool_calls share an id; give each call its own id")
    if pending:
        raise ValueError(
            f"messages: call(s) {', '.join(pending)} of the last assistant message have no tool message "
            f"with their result; add one per call"
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt per request (a string or a list of one string)")
            value = value[0]
        if not value.strip():
            raise ValueError("is empty")
        return valid_unicode(value)


class GenerateRequest(_Sampling):
    """The plan's endpoint: a prompt in, text out; `chat` wraps the prompt in the chat template."""

    prompt: str = Field(min_length=1)
    system: str | None = None
    chat: bool = True
    rag: bool = RAG_FIELD
    temperature: float = Field(0.7, ge=0, le=2)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value):
        if not value.strip():
            raise ValueError("is empty")
        return valid_unicode(value)

    @field_validator("system")
    @classmethod
    def _unicode(cls, value):
        return valid_unicode(value) if value is not None else value
