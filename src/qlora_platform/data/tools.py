"""Tool use: function-calling records in, one normalised shape out; calls rendered, parsed back and checked.

A tool record is an SFT chat that declares tools (JSON schemas) and may hold calls:

    {"tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
     "messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": {...}}}]},
                  {"role": "tool", "tool_call_id": "call_0", "name": "f", "content": "..."},
                  {"role": "assistant", "content": "the final answer"}]}

Accepted inputs: the OpenAI / TRL shape above (arguments as an object or a JSON string,
`tools` as a list or a JSON string, bare `{name, description, parameters}` tools), and
LLaMA-Factory's ShareGPT shape (`conversations` with `function_call` and `observation`
turns, `tools` as a JSON string). Every call must name a declared tool, its arguments
must fit the tool's JSON schema, and every call gets its result before the next
assistant turn.

Rendering: a chat template that renders tools itself (it reads `tools` and `tool_calls`)
gets the record as Hugging Face passes it. Any other template gets the platform's format
(the Hermes / Qwen convention): the tool schemas in the system message between `<tools>`
tags, each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the
assistant's text, tool results in a user turn between `<tool_response>` tags.
`parse_tool_calls` reads that format back, plus Mistral's `[TOOL_CALLS]` list and a
bare `{"name", "arguments"|"parameters"}` object (Llama 3).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import SchemaError
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from ..errors import UserError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
MISTRAL_CALLS = "[TOOL_CALLS]"
# OpenAI's rule for function names.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOLS_PROMPT = (
    "You may call these functions:\n<tools>\n{schemas}\n</tools>\n"
    'To call one, answer <tool_call>{"name": ..., "arguments": {...}}</tool_call>. '
    "Otherwise answer in plain text."
)
JSON_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
# LLaMA-Factory's ShareGPT roles for tool use, beside the usual human/gpt/system.
SHAREGPT_TOOL_ROLES = {"function_call": "assistant", "observation": "tool"}


def is_tool_record(record: dict) -> bool:
    """A record that declares tools or holds a call or a tool result."""
    if record.get("tools"):
        return True
    turns = record.get("messages") or record.get("conversations")
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        if turn.get("tool_calls") or turn.get("role") in ("tool", "function"):
            return True
        if str(turn.get("from", "")).lower() in SHAREGPT_TOOL_ROLES:
            return True
    return False


# -- schemas and calls ---------------------------------------------------------------------------


def _location(prefix: str, path) -> str:
    return ".".join([prefix, *(str(p) for p in path)])


def normalise_tools(raw: Any, where: str) -> list[dict]:
    """A `tools` value as a list of `{"type": "function", "function": {...}}`, each schema checked;
    a problem is one UserError naming its place (`tools.1.function.parameters.properties.x.type`)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where}: tools is a string that is not JSON ({err.msg}); give a list of tool schemas"
            ) from None
    if not isinstance(raw, list):
        raise UserError(f"{where}: tools must be a list of tool schemas, got {type(raw).__name__}")
    tools, names = [], set()
    for i, tool in enumerate(raw):
        place = f"tools.{i}"
        if not isinstance(tool, dict):
            raise UserError(f"{where}: {place} must be an object, got {type(tool).__name__}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise UserError(f"{where}: {place}.type is '{tool.get('type')}'; only 'function' tools are supported")
            fn, place = tool.get("function"), f"{place}.function"
            if not isinstance(fn, dict):
                raise UserError(f"{where}: {place} must be an object with name, description and parameters")
        else:
            fn = tool
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UserError(f"{where}: {place}.name must be 1-64 letters, digits, underscores or dashes, got {name!r}")
        if name in names:
            raise UserError(f"{where}: {place}.name '{name}' is declared twice")
        names.add(name)
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise UserError(f"{where}: {place}.description must be a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise UserError(f"{where}: {place}.parameters must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise UserError(f"{where}: {place}.parameters.type must be 'object' (arguments are a JSON object)")
        try:
            validator_for(params).check_schema(params)
        except SchemaError as err:
            at = _location(place + ".parameters", err.path)
            hint = f" (types: {', '.join(JSON_TYPES)})" if err.path and err.path[-1] == "type" else ""
            raise UserError(f"{where}: {at}: {err.message}{hint}") from None
        _check_refs(params, params, f"{where}: {place}.parameters")
        out = {"name": name, "description": description, "parameters": params}
        tools.append({"type": "function", "function": out})
    return tools


def _check_refs(node: Any, root: dict, where: str, path: str = "") -> None:
    """Every `$ref` of a schema points inside it (`#/...`) at something that exists: a schema is
    checked on its own, with nothing fetched."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_refs(item, root, where, f"{path}.{i}")
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if isinstance(ref, str):
        target: Any = root
        parts = ref[1:].lstrip("/").split("/") if ref.startswith("#") else None
        for part in parts or []:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                target = None
                break
        if parts is None or target is None:
            raise UserError(
                f"{where}{path}.$ref: '{ref}' does not resolve inside the schema; inline it or add it under $defs"
            )
    for key, value in node.items():
        if key not in ("enum", "const", "default", "examples"):
            _check_refs(value, root, where, f"{path}.{key}")


def tools_by_name(tools: list[dict]) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"] for t in tools}


def call_error(name: Any, arguments: Any, declared: dict[str, dict]) -> str | None:
    """Why a call does not fit the declared tools (unknown name, arguments off the schema), or None."""
    if not isinstance(name, str):
        return f"names its function with a {type(name).__name__}; function.name must be a string"
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        return f"calls '{name}', which is not a declared tool (declared: {known})"
    if not isinstance(arguments, dict):
        return f"the arguments of '{name}' must be a JSON object, got {type(arguments).__name__}"
    schema = declared[name]["parameters"]
    try:
        error = best_match(validator_for(schema)(schema).iter_errors(arguments))
    except Exception as err:  # noqa: BLE001 - a schema jsonschema cannot apply is the tool's fault, said as such
        return f"the schema of '{name}' cannot be applied ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if error is not None:
        return f"the arguments of '{name}' do not fit its schema: {_location('arguments', error.path)}: {error.message}"
    return None


def _arguments(value: Any, where: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: the arguments are a string that is not JSON ({err.msg})") from None
    return {} if value is None else value


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise UserError(f"{where}: content must be a string, got {type(value).__name__}")


# -- records -------------------------------------------------------------------------------------


def _openai_messages(raw: Any, where: str) -> list[dict]:
    if not isinstance(raw, list):
        raise UserError(f"{where}: 'messages' must be a list of messages")
    out = []
    for i, m in enumerate(raw):
        place = f"{where}: message {i}"
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"{place} needs a 'role'")
        role = "tool" if m["role"] == "function" else m["role"]
        msg: dict = {"role": role, "content": _content(m.get("content"), place)}
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise UserError(f"{place}: tool_calls must be a list")
            msg["tool_calls"] = []
            for k, call in enumerate(calls):
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise UserError(f"{place}: tool call {k} needs function.name (a string) and function.arguments")
                msg["tool_calls"].append(
                    {
                        "id": str(call.get("id") or ""),
                        "name": fn["name"],
                        "arguments": _arguments(fn.get("arguments", fn.get("parameters")), f"{place} call {k}"),
                    }
                )
        if role == "tool":
            msg["tool_call_id"] = str(m.get("tool_call_id") or "")
            msg["name"] = str(m.get("name") or "")
        out.append(msg)
    return out


def _sharegpt_messages(raw: Any, where: str, sharegpt_roles: dict[str, str]) -> list[dict]:
    if not isinstance(raw, list):
        raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    out: list[dict] = []
    for i, turn in enumerate(raw):
        place = f"{where}: turn {i}"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{place} needs 'from' and 'value'")
        sender = str(turn["from"]).lower()
        role = SHAREGPT_TOOL_ROLES.get(sender) or sharegpt_roles.get(sender)
        if role is None:
            known = ", ".join(sorted({*sharegpt_roles, *SHAREGPT_TOOL_ROLES}))
            raise UserError(f"{place} is from '{turn['from']}'; expected one of {known}")
        value = turn["value"]
        if sender == "function_call":
            calls = _json_value(value)
            if isinstance(calls, dict):
                calls = [calls]
            if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls
            ):
                raise UserError(
                    f'{place}: a function_call value is JSON {{"name": ..., "arguments": {{...}}}} (or a list of them)'
                )
            tool_calls = [
                {"id": "", "name": c["name"], "arguments": _arguments(c.get("arguments"), f"{place} call {k}")}
                for k, c in enumerate(calls)
            ]
            out.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        elif sender == "observation":
            pending = len(out[-1].get("tool_calls", [])) if out and out[-1]["role"] == "assistant" else 1
            results = _json_value(value) if pending > 1 else None
            texts = results if isinstance(results, list) and len(results) == pending else [value]
            for text in texts:
                content = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
                out.append({"role": "tool", "content": content, "tool_call_id": "", "name": ""})
        else:
            out.append({"role": role, "content": _content(value, place)})
    return out


def _json_value(value: Any) -> Any:
    """The JSON a string holds, or None when it is not a string of JSON."""
    if not isinstance(value, str):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return None


def _link_results(messages: list[dict], declared: dict[str, dict], where: str) -> None:
    """Ids for calls that lack one, each tool result tied to its call, every check of a call."""
    pending: dict[str, dict] = {}  # calls waiting for a result, oldest first
    for i, msg in enumerate(messages):
        place = f"{where}: message {i}"
        role = msg["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise UserError(f"{place} has role '{role}'; roles are system, user, assistant, tool")
        if role == "system" and i != 0:
            raise UserError(f"{place}: a system message may only come first")
        if role in ("user", "assistant") and pending:
            raise UserError(
                f"{place}: call(s) {', '.join(c['name'] for c in pending.values())} of an earlier assistant turn "
                f"have no tool result; every call gets its result before the next turn"
            )
        if role == "assistant":
            for k, call in enumerate(msg.get("tool_calls", [])):
                error = call_error(call["name"], call["arguments"], declared)
                if error:
                    raise UserError(f"{place}: tool call {k} {error}")
                call["id"] = call["id"] or f"call_{i}_{k}"
                if call["id"] in pending:
                    raise UserError(f"{place}: two calls share the id '{call['id']}'")
                pending[call["id"]] = call
            if not msg.get("tool_calls") and not msg["content"].strip():
                raise UserError(
                    f"{place}: assistant message is empty; an empty answer teaches the model to say nothing"
                )
        elif role == "tool":
            if not pending:
                raise UserError(
                    f"{place}: a tool result with no call before it; give the assistant turn before it the "
                    f"tool_calls it answers, or drop the result"
                )
            wanted = msg["tool_call_id"] or next(iter(pending))
            if wanted not in pending:
                raise UserError(f"{place}: tool_call_id '{wanted}' names no call waiting for its result")
            call = pending.pop(wanted)
            msg["tool_call_id"], msg["name"] = wanted, msg["name"] or call["name"]
        elif role == "user" and not msg["content"].strip():
            raise UserError(f"{place}: user message is empty or whitespace")


def to_tool_record(record: dict, where: str, sharegpt_roles: dict[str, str]) -> dict:
    """One tool record (OpenAI/TRL or LLaMA-Factory ShareGPT shape) normalised and checked."""
    tools = normalise_tools(record.get("tools") or [], where)
    if "conversations" in record:
        messages = _sharegpt_messages(record["conversations"], where, sharegpt_roles)
    else:
        messages = _openai_messages(record.get("messages"), where)
    system = record.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if not messages:
        raise UserError(f"{where}: the conversation is empty")
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: no user message; a training example needs a prompt and an answer")
    if messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the last message must be the assistant's (a call or an answer), got '{messages[-1]['role']}'"
        )
    _link_results(messages, tools_by_name(tools), where)
    for msg in messages:
        if "tool_calls" in msg:
            msg["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in msg["tool_calls"]
            ]
    meta = {k: v for k, v in record.items() if k in ("category", "source", "id")}
    return {"tools": tools, "messages": messages, **meta}


def calls_of(message: dict) -> list[dict]:
    """`[{"name", "arguments"}]` of a normalised assistant message."""
    return [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls", [])
    ]


# -- rendering -----------------------------------------------------------------------------------


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool schemas and calls itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and "tool_call" in template


def call_text(name: str, arguments: Any) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def tools_prompt(tools: list[dict]) -> str:
    schemas = (json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")) for t in tools)
    return TOOLS_PROMPT.replace("{schemas}", "\n".join(schemas))


def platform_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages in the platform's format: plain system/user/assistant turns any chat template renders."""
    out: list[dict] = []
    if tools:
        if messages and messages[0]["role"] == "system" and messages[0]["content"].strip():
            out.append({"role": "system", "content": f"{messages[0]['content'].rstrip()}\n\n{tools_prompt(tools)}"})
        else:
            out.append({"role": "system", "content": tools_prompt(tools)})
        messages = messages[1:] if messages and messages[0]["role"] == "system" else messages
    previous = None
    for msg in messages:
        if msg["role"] == "tool":
            block = f"{RESPONSE_OPEN}\n{msg['content']}\n{RESPONSE_CLOSE}"
            if previous == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif msg.get("tool_calls"):
            parts = [msg["content"].strip()] if msg["content"].strip() else []
            parts += [call_text(c["name"], c["arguments"]) for c in calls_of(msg)]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": msg["role"], "content": msg["content"]})
        previous = msg["role"]
    return out


def template_inputs(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to hand to `apply_chat_template`: as they are for a template that renders
    tools, else in the platform's format with no `tools` argument."""
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not tools and not has_tool_turns:
        return messages, None
    if renders_tools(tokenizer):
        return _template_ids(messages), tools or None
    return platform_messages(messages, tools), None


def _template_ids(messages: list[dict]) -> list[dict]:
    """The messages with call ids a template accepts: some (Mistral's) take only 9 letters or digits,
    so other ids are renamed, consistently between a call and its result."""
    ids = [c["id"] for m in messages for c in m.get("tool_calls", [])]
    if all(len(i) == 9 and i.isalnum() for i in ids):
        return messages
    rename = {old: f"call{n:05d}" for n, old in enumerate(dict.fromkeys(ids))}
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": rename[c["id"]]} for c in m["tool_calls"]]}
        elif m["role"] == "tool" and m.get("tool_call_id") in rename:
            m = {**m, "tool_call_id": rename[m["tool_call_id"]]}
        out.append(m)
    return out


# -- reading calls back --------------------------------------------------------------------------


@dataclass
class ParsedAnswer:
    """A generated answer split into its text and its calls; `errors` names blocks that did not parse."""

    content: str
    calls: list[dict] = field(default_factory=list)  # [{"name", "arguments"}]
    errors: list[str] = field(default_factory=list)


def _as_calls(obj: Any) -> list[dict] | None:
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            # A string that is not JSON stays a string: the schema check then says it is not an object.
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)
        calls.append({"name": item["name"], "arguments": args})
    return calls


def _decode_json(text: str) -> tuple[Any, int] | None:
    """The first JSON value at the start of `text` (after spaces) and where it ends, or None."""
    stripped = text.lstrip()
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    return value, end + len(text) - len(stripped)


def parse_tool_calls(text: str) -> ParsedAnswer:
    """Calls out of generated text: `<tool_call>` blocks (the last may lack its closing tag when
    generation stopped at the end of the turn), a `[TOOL_CALLS]` list, or an answer that is one
    `{"name", "arguments"}` object."""
    if CALL_OPEN in text:
        content, calls, errors = [], [], []
        rest = text
        while CALL_OPEN in rest:
            before, rest = rest.split(CALL_OPEN, 1)
            content.append(before)
            # The JSON is read first, so a closing tag inside an argument string does not cut the call.
            decoded = _decode_json(rest)
            if decoded is not None:
                after = rest[decoded[1] :].lstrip()
                if not after or after.startswith(CALL_CLOSE):
                    rest = after[len(CALL_CLOSE) :]
                    parsed = _as_calls(decoded[0])
                    if parsed is None:
                        errors.append(f"a {CALL_OPEN} block is not a call object: {json.dumps(decoded[0])[:80]}")
                    else:
                        calls += parsed
                    continue
            body, _, rest = rest.partition(CALL_CLOSE)
            errors.append(f"a {CALL_OPEN} block is not a JSON call object: {body.strip()[:80]!r}")
        content.append(rest)
        return ParsedAnswer(" ".join(part.strip() for part in content if part.strip()), calls, errors)
    stripped = text.strip()
    if stripped.startswith(MISTRAL_CALLS):
        decoded = _decode_json(stripped[len(MISTRAL_CALLS) :])
        parsed = _as_calls(decoded[0]) if decoded else None
        if parsed is None:
            return ParsedAnswer("", [], [f"a {MISTRAL_CALLS} list does not parse: {stripped[:80]!r}"])
        return ParsedAnswer(stripped[len(MISTRAL_CALLS) + decoded[1] :].strip(), parsed, [])  # type: ignore[index]
    if stripped.startswith("{"):
        decoded = _decode_json(stripped)
        parsed = _as_calls(decoded[0]) if decoded and not stripped[decoded[1] :].strip() else None
        if parsed and isinstance(decoded[0], dict) and {"arguments", "parameters"} & set(decoded[0]):  # type: ignore[index]
            return ParsedAnswer("", parsed, [])
    return ParsedAnswer(text.strip())


def check_calls(parsed: ParsedAnswer, declared: dict[str, dict]) -> list[str]:
    """Every problem of a parsed answer's calls: blocks that did not parse, calls off the declared tools."""
    problems = list(parsed.errors)
    for k, call in enumerate(parsed.calls):
        error = call_error(call["name"], call["arguments"], declared)
        if error:
            problems.append(f"call {k} {error}")
    return problems


def could_start_call(text: str) -> int:
    """Where in `text` a call may begin (a full or partial opening marker at the end, or a bare
    JSON object from the start), or -1: text before it is safe to stream as content."""
    at = text.find(CALL_OPEN)
    if at >= 0:
        return at
    stripped = text.lstrip()
    if stripped.startswith(("{", MISTRAL_CALLS)) or (stripped and MISTRAL_CALLS.startswith(stripped)):
        return len(text) - len(stripped)
    for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:k]):
            return len(text) - k
    return -1


# -- comparing calls -----------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """Key order free, 2 == 2.0: the structural form two argument objects are compared in."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def call_key(call: dict) -> str:
    return json.dumps([call["name"], _canonical(call["arguments"])], sort_keys=True, ensure_ascii=False)


def calls_equal(expected: list[dict], got: list[dict]) -> bool:
    """The same calls, each with structurally equal arguments, in any order."""
    return sorted(map(call_key, expected)) == sorted(map(call_key, got))
