"""Tool calls in generated answers, for `qlora serve` and `qlora chat`: how a request with tools is
prompted, how its answer is read back, and what of its text may stream before the answer is whole.

    plan = ToolPlan.of(request, engine)        # None: the request uses no tools
    answer = plan.read(generated_text)         # ToolAnswer: OpenAI tool_calls, or text and the reason
    held = HeldText(plan.prefix); held.push(piece) -> text safe to stream now

A call is returned only when it parses and fits its tool's schema (data/tools.py); otherwise the
text is the answer and `error` says why. With tool_choice "required" or a named function, on a
template that does not render tools itself, the answer starts with the opening of a call in the
platform's format (`prefix`), so the model has to call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..data.tools import CALL_OPEN, check_calls, could_start_call, parse_tool_calls, renders_tools, tools_by_name

if TYPE_CHECKING:
    from .protocol import ChatRequest


@dataclass
class ToolAnswer:
    """A generated answer as the API returns it for a request with tools: `calls` in the OpenAI shape
    (arguments as a JSON string) when every call parsed and fits its schema, else none, with the raw
    text as `content` and the reason in `error`."""

    content: str | None
    calls: list[dict] = field(default_factory=list)
    error: str | None = None

    def finish_reason(self, result) -> str:
        return "tool_calls" if self.calls else result.finish_reason

    def extra(self) -> dict:
        """The choice's non-standard field naming why the answer's calls were not returned."""
        return {"tool_call_error": self.error} if self.error else {}


@dataclass
class ToolPlan:
    """How a chat request with tools is prompted and its answer read back. `prefix` is the opening of
    a call that the prompt ends with (tool_choice "required" or a named function, on a template that
    does not render tools itself); it is also the start of the answer the model continues."""

    tools: list[dict]
    mode: str  # auto, required or function
    function: str | None  # the function tool_choice names
    parallel: bool
    prefix: str = ""

    @classmethod
    def of(cls, req: ChatRequest, engine) -> ToolPlan | None:
        """The plan of a request whose tools are in use (declared, tool_choice not "none"), else None."""
        if req.tool_mode is None or not req.tools:
            return None
        plan = cls(req.tools, req.tool_mode, req.forced_function, req.parallel_tool_calls)
        if not renders_tools(engine.tokenizer):
            if plan.mode == "required":
                plan.prefix = f'{CALL_OPEN}\n{{"name": "'
            elif plan.function is not None:
                plan.prefix = f'{CALL_OPEN}\n{{"name": {json.dumps(plan.function)}, "arguments":'
        return plan

    @property
    def one_call(self) -> bool:
        """The answer is one call: generation may stop where that call closes."""
        return bool(self.prefix) and (self.function is not None or not self.parallel)

    def read(self, generated: str) -> ToolAnswer:
        """The answer of `generated` (the text after the prompt, so after the prefix)."""
        text = self.prefix + generated
        parsed = parse_tool_calls(text)
        error = self._error(parsed)
        if error is not None:
            return ToolAnswer(text, [], error)
        if not parsed.calls:
            return ToolAnswer(text)
        calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
            }
            for c in parsed.calls
        ]
        return ToolAnswer(parsed.content or None, calls)

    def _error(self, parsed) -> str | None:
        problems = check_calls(parsed, tools_by_name(self.tools))
        if problems:
            return problems[0]
        for k, call in enumerate(parsed.calls):
            if self.function is not None and call["name"] != self.function:
                return f"call {k} calls '{call['name']}', but tool_choice names '{self.function}'"
        if not parsed.calls and self.mode != "auto":
            wanted = "a call" if self.function is None else f"a call of '{self.function}'"
            return f"tool_choice needs {wanted}; the answer holds none"
        if len(parsed.calls) > 1 and not self.parallel:
            return f"the answer holds {len(parsed.calls)} calls and parallel_tool_calls is false"
        return None


class HeldText:
    """The streamed text of a request with tools: content goes out until a call may begin
    (`could_start_call`); from there on it is held until the answer is read whole."""

    def __init__(self, prefix: str):
        self.text, self.sent = prefix, 0  # the prefix opens a call: held from the start

    def push(self, piece: str) -> str:
        """What of the text is safe to stream now."""
        self.text += piece
        at = could_start_call(self.text)
        upto = len(self.text) if at < 0 else at
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def rest(self, answer: ToolAnswer) -> str:
        """The held text still to stream as content: the text beside the calls, or all of it."""
        held = self.text[self.sent :]
        return parse_tool_calls(held).content if answer.calls else held
