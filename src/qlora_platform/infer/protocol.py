"""Request bodies of the HTTP API (OpenAI-compatible plus the plan's /generate), validated at the edge.

    req = ChatRequest.model_validate(body)      # pydantic: types and ranges
    params = req.sampling(default_max_tokens)   # -> SamplingParams

Everything a client can get wrong is caught here or in `SamplingParams.validate`
(which also checks prompt + max_tokens against the context) before the model
sees the request. Unknown fields are accepted and ignored, as OpenAI's server
does for fields it does not use, except those whose silent ignoring would
change results (n > 1, logprobs, tools, logit_bias, non-zero presence or
frequency penalties, a response_format other than text, echo, suffix, best_of > 1),
which are refused clearly. Numbers are bounded so that no value can break the
sampler: a temperature below `MIN_TEMPERATURE` is greedy (dividing by it would
overflow the logits), penalties and seeds have finite ranges. Text that is not
valid Unicode (a lone surrogate from a `\\ud800` JSON escape) is refused here
rather than failing in the tokenizer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .sampling import MIN_REPETITION_PENALTY, MIN_TEMPERATURE, SEED_RANGE, SamplingParams


def valid_unicode(value: str) -> str:
    """The text unchanged, or a ValueError when it holds a lone surrogate (not encodable as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {err.start}); send UTF-8 text") from None
    return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _unicode(cls, value):
        return valid_unicode(value)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _unicode(cls, value):
        return valid_unicode(value) if isinstance(value, str) else value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


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
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1, description="one choice per request")

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

    @field_validator("logprobs", "top_logprobs", "tools", "functions", "echo", "suffix", "logit_bias")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
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


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _some_text(cls, value):
        if not any(m.text().strip() for m in value if m.role == "user"):
            raise ValueError("needs at least one user message with text")
        return value


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
