"""Record formats in, one chat format out.

Every training record becomes either `{"messages": [{"role", "content"}, ...]}`
(instruction tuning; the loss is on assistant turns) or `{"text": "..."}`
(continued pre-training; the loss is on every token). Accepted inputs:

- `messages`: OpenAI/HF chat form, roles system/user/assistant;
- `conversations`: ShareGPT form, `{"from": "human"|"gpt"|"system", "value": ...}`;
- alpaca: `instruction`, optional `input`, `output`;
- `prompt`/`completion` pairs and plain `text`;
- tool use (data/tools.py): `tools` with OpenAI-style `tool_calls` and `tool` messages, or
  LLaMA-Factory's `function_call` / `observation` turns; kept as `{"tools", "messages"}`.

Problems are `UserError`s that name the file and line: `data.jsonl:12: ...`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .tools import calls_of, is_tool_record, to_tool_record

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


def parse_jsonl_line(line: str, where: str) -> dict:
    """One JSONL line as a dict, or a UserError that names `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of an existing file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, not a JSONL data file; pass a file such as {path / 'train.jsonl'}")
    if not path.is_file():
        raise UserError(f"data file '{path}' does not exist")
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError:
        raise UserError(not_utf8(path)) from None


def not_utf8(path: Path) -> str:
    """One line that names the first line and column of `path` that is not UTF-8 text."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    f"a data file is UTF-8 JSONL, one JSON object a line"
                )
    return f"{path}: not UTF-8 text (a character is cut off at the end); a data file is UTF-8 JSONL"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line stops with file:line."""
    for lineno, line in iter_jsonl_lines(path):
        yield lineno, parse_jsonl_line(line, f"{path}:{lineno}")


def write_jsonl(path: str | Path, records) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _check_chat(messages: list[dict], where: str) -> list[dict]:
    if not messages:
        raise UserError(f"{where}: the conversation is empty")
    for i, msg in enumerate(messages):
        if msg["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has role '{msg['role']}'; roles are {', '.join(ROLES)}")
        if msg["role"] == "system" and i != 0:
            raise UserError(f"{where}: a system message may only come first (message {i})")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's answer, got '{messages[-1]['role']}'")
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: no user message; a training example needs a prompt and an answer")
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise UserError(
                f"{where}: assistant message {i} is empty or whitespace; an empty answer "
                f"teaches the model to say nothing (fix or remove the record)"
            )
        if msg["role"] == "user" and not msg["content"].strip():
            raise UserError(f"{where}: user message {i} is empty or whitespace")
    return messages


def to_chat_record(record: dict, where: str, fmt: str = "auto") -> dict:
    """Normalise one record to {"messages": [...]} or {"text": ...}; extra keys are kept as metadata."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    meta = {k: v for k, v in record.items() if k in ("category", "source", "id")}
    if fmt in ("messages", "sharegpt") and is_tool_record(record):
        return to_tool_record(record, where, SHAREGPT_ROLES)
    if fmt == "messages":
        raw = record.get("messages")
        if not isinstance(raw, list):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"{where}: message {i} needs 'role' and 'content'")
            msgs.append(
                {
                    "role": _text(m["role"], f"message {i} role", where),
                    "content": _text(m["content"], f"message {i} content", where),
                }
            )
        return {"messages": _check_chat(msgs, where), **meta}
    if fmt == "sharegpt":
        raw = record.get("conversations")
        if not isinstance(raw, list):
            raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise UserError(f"{where}: conversation turn {i} needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise UserError(
                    f"{where}: turn {i} is from '{m['from']}'; expected one of {', '.join(sorted(SHAREGPT_ROLES))}"
                )
            msgs.append({"role": role, "content": _text(m["value"], f"turn {i} value", where)})
        return {"messages": _check_chat(msgs, where), **meta}
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in record:
                raise UserError(
                    f"{where}: missing field '{key}' (alpaca records need instruction, optional input, and output)"
                )
        prompt = _text(record["instruction"], "instruction", where).strip()
        extra = _text(record.get("input") or "", "input", where).strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        msgs = []
        if record.get("system"):
            msgs.append({"role": "system", "content": _text(record["system"], "system", where)})
        msgs += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record["output"], "output", where)},
        ]
        return {"messages": _check_chat(msgs, where), **meta}
    if fmt == "prompt_completion":
        msgs = [
            {"role": "user", "content": _text(record["prompt"], "prompt", where)},
            {"role": "assistant", "content": _text(record["completion"], "completion", where)},
        ]
        return {"messages": _check_chat(msgs, where), **meta}
    if fmt == "text":
        text = _text(record.get("text"), "text", where)
        if not text.strip():
            raise UserError(f"{where}: 'text' is empty or whitespace")
        return {"text": text, **meta}
    keys = ", ".join(sorted(record)) or "none"
    raise UserError(
        f"{where}: unknown record format (keys: {keys}); expected messages, conversations, "
        f"instruction/output, prompt/completion or text"
    )


def prompt_of(record: dict) -> str:
    """The text that identifies a record's question (for deduplication and leakage checks)."""
    if "text" in record:
        return record["text"]
    return "\n".join(m["content"] for m in record["messages"] if m["role"] != "assistant")


def answer_of(record: dict) -> str:
    if "text" in record:
        return record["text"]
    return "\n".join(
        "\n".join([m["content"], *(json.dumps(c, sort_keys=True, ensure_ascii=False) for c in calls_of(m))]).strip()
        for m in record["messages"]
        if m["role"] == "assistant"
    )


def normalise_key(text: str) -> str:
    return " ".join(text.lower().split())


def load_records(path: str | None, what: str) -> list[dict]:
    """The chat records of a prepared JSONL file (`what` names its config key); [] when no path is set."""
    if not path:
        return []
    if not Path(path).is_file():
        raise UserError(f"{what} '{path}' does not exist; run 'qlora prepare' first or set data.{what}")
    records = [to_chat_record(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]
    if not records:
        raise UserError(f"{what} '{path}' has no records")
    return records
