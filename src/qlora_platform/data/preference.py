"""Record kinds beside SFT chats: preference pairs, unpaired KTO records and prompt-only records.

Each kind is normalised to one shape; `prompt` is always a list of chat messages
(optional system first, ending with a user message) and answers are plain strings:

- preference: `{"prompt": [...], "chosen": "...", "rejected": "..."}`;
- kto:        `{"prompt": [...], "completion": "...", "label": true | false}` (true: desirable);
- prompt:     `{"prompt": [...]}` (for RL: the policy writes the answer).

`category`, `source` and `id` are kept as metadata, as for SFT records. Accepted inputs:

- TRL: `prompt`/`chosen`/`rejected` as strings; `prompt` as messages with `chosen`/`rejected`
  as one-assistant-message lists; `chosen`/`rejected` as whole conversations that differ only
  in their last (assistant) message; `prompt`/`completion`/`label` for KTO; `prompt` alone;
- LLaMA-Factory: alpaca `instruction`/`input`/`system` + `chosen`/`rejected` strings; ShareGPT
  `conversations` + `chosen`/`rejected` as one `{from, value}` message each; any SFT record
  with a boolean `kto_tag` for KTO.

A file (and a `qlora prepare` run) holds one kind; a record of another kind stops with its line.

    kind = detect_kind(raw)                     # "sft" | "preference" | "kto" | "prompt"
    record = to_kind_record(raw, "pairs.jsonl:3", kind)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .formats import (
    SHAREGPT_ROLES,
    answer_of,
    iter_jsonl_lines,
    normalise_key,
    parse_jsonl_line,
    prompt_of,
    to_chat_record,
)
from .sources import _ANSWER_NAMES
from .split import split_holdout

KINDS = ("sft", "preference", "kto", "prompt")
META_KEYS = ("category", "source", "id")
# (one record, several records) for messages.
KIND_NAMES = {
    "sft": ("an SFT record", "SFT records"),
    "preference": ("a preference pair", "preference pairs"),
    "kto": ("a KTO record", "KTO records"),
    "prompt": ("a prompt-only record", "prompt-only records"),
}
# A key that holds an answer makes a record with a `prompt` an SFT record (or one to map with --columns).
_NOT_PROMPT_ONLY = {*_ANSWER_NAMES, "messages", "conversations", "instruction", "text"}
# Stands in for the answer while the SFT converters read a prompt; it never reaches a record.
_PLACEHOLDER = "placeholder answer"


def detect_kind(record: dict) -> str:
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "kto_tag" in record or ("label" in record and "completion" in record):
        return "kto"
    if "prompt" in record and not any(str(k).lower() in _NOT_PROMPT_ONLY for k in record):
        return "prompt"
    return "sft"


def _meta(record: dict) -> dict:
    return {k: v for k, v in record.items() if k in META_KEYS}


def _with_system(record: dict, messages: list[dict], where: str) -> list[dict]:
    """A separate `system` field (LLaMA-Factory's ShareGPT form) as the first message, unless one is there."""
    system = record.get("system")
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    if not isinstance(system, str):
        raise UserError(f"{where}: system must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}, *messages]


def _end_with_user(messages: list[dict], where: str) -> list[dict]:
    if messages[-1]["role"] != "user":
        raise UserError(
            f"{where}: the prompt's last message is from '{messages[-1]['role']}'; it must be the user's "
            f"question (the answer goes in chosen/rejected or completion)"
        )
    return messages


def prompt_messages(record: dict, where: str) -> list[dict]:
    """The prompt of a record as chat messages, read by the SFT converters with a stand-in answer."""
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            sft, fmt = {"prompt": prompt, "completion": _PLACEHOLDER}, "prompt_completion"
        elif isinstance(prompt, list):
            sft, fmt = {"messages": [*prompt, {"role": "assistant", "content": _PLACEHOLDER}]}, "messages"
        else:
            raise UserError(
                f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, "
                f"got {type(prompt).__name__}"
            )
    elif "conversations" in record or "messages" in record:
        turns = record.get("conversations", record.get("messages"))
        if not isinstance(turns, list):
            raise UserError(f"{where}: 'conversations' or 'messages' must be a list of messages")
        # LLaMA-Factory writes {from, value} turns under either key; OpenAI-style {role, content} ones under messages.
        if "conversations" in record or any(isinstance(t, dict) and "from" in t for t in turns):
            sft, fmt = {"conversations": [*turns, {"from": "gpt", "value": _PLACEHOLDER}]}, "sharegpt"
        else:
            sft, fmt = {"messages": [*turns, {"role": "assistant", "content": _PLACEHOLDER}]}, "messages"
    elif "instruction" in record:
        sft = {k: record[k] for k in ("instruction", "input", "system") if k in record}
        sft, fmt = {**sft, "output": _PLACEHOLDER}, "alpaca"
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise UserError(
            f"{where}: no prompt (keys: {keys}); give 'prompt', 'instruction', 'conversations' or 'messages'"
        )
    messages = to_chat_record(sft, where, fmt)["messages"][:-1]
    if fmt != "alpaca":  # the alpaca converter reads `system` itself
        messages = _with_system(record, messages, where)
    return _end_with_user(messages, where)


def answer_text(value, key: str, where: str) -> str:
    """An answer given as a string, one assistant message, or a list holding one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise UserError(
                f"{where}: '{key}' holds {len(value)} messages; give the answer as a string or one "
                f"assistant message (earlier turns belong in the prompt)"
            )
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        if SHAREGPT_ROLES.get(str(role).lower()) != "assistant":
            raise UserError(f"{where}: '{key}' is a message from '{role}'; the answer must be the assistant's")
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string or one assistant message, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: '{key}' is empty or whitespace; give it the answer's text (or remove the record)")
    return value


def _implicit_prompt(record: dict, where: str) -> tuple[list[dict], str, str]:
    """TRL's implicit prompt: `chosen` and `rejected` are whole conversations that differ in the last message."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1 and len(rejected) > 1):
        raise UserError(
            f"{where}: the pair has no prompt; give 'prompt' (or 'instruction', 'conversations', 'messages'), "
            f"or 'chosen' and 'rejected' as whole conversations that share all but their last message"
        )
    chosen_text = answer_text(chosen[-1], "chosen", where)
    rejected_text = answer_text(rejected[-1], "rejected", where)
    prompt = prompt_messages({"prompt": chosen[:-1]}, where)
    if prompt != prompt_messages({"prompt": rejected[:-1]}, where):
        raise UserError(
            f"{where}: 'chosen' and 'rejected' differ before their last message; without a 'prompt' both "
            f"must hold the same conversation and differ only in the final assistant answer"
        )
    return prompt, chosen_text, rejected_text


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def to_preference_record(record: dict, where: str) -> dict:
    """{"prompt": [messages], "chosen": str, "rejected": str} (+ metadata) from any accepted pair shape."""
    for key, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if key not in record:
            raise UserError(
                f"{where}: the pair has '{other}' but no '{key}'; a preference pair needs both answers to "
                f"one prompt (chosen: the better, rejected: the worse)"
            )
    if not any(k in record for k in ("prompt", "instruction", "conversations", "messages")):
        prompt, chosen, rejected = _implicit_prompt(record, where)
    else:
        chosen = answer_text(record["chosen"], "chosen", where)
        rejected = answer_text(record["rejected"], "rejected", where)
        prompt = prompt_messages(record, where)
    if _same_text(chosen, rejected):
        raise UserError(
            f"{where}: 'chosen' and 'rejected' are the same text; a pair teaches nothing without a "
            f"difference (fix or remove it)"
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_meta(record)}


def to_kto_record(record: dict, where: str) -> dict:
    """{"prompt": [messages], "completion": str, "label": bool} (+ metadata): TRL's shape or an SFT record
    with LLaMA-Factory's `kto_tag`."""
    key = "label" if "label" in record else "kto_tag"
    if key not in record:
        raise UserError(f"{where}: the KTO record has no 'label'; add true (desirable) or false (undesirable)")
    label = record[key]
    if not isinstance(label, bool):
        raise UserError(
            f"{where}: '{key}' must be true or false (a JSON boolean), got {json.dumps(label)}; "
            f"true marks a desirable completion, false an undesirable one"
        )
    if "completion" in record:
        completion = answer_text(record["completion"], "completion", where)
        prompt = prompt_messages(record, where)
    else:
        chat = to_chat_record({k: v for k, v in record.items() if k != key}, where)
        if "messages" not in chat:
            raise UserError(f"{where}: a KTO record needs a prompt and a completion, not plain 'text'")
        prompt = _end_with_user(_with_system(record, chat["messages"][:-1], where), where)
        completion = chat["messages"][-1]["content"]
    return {"prompt": prompt, "completion": completion, "label": label, **_meta(record)}


def to_prompt_record(record: dict, where: str) -> dict:
    """{"prompt": [messages]} (+ metadata): a prompt with no answer, for RL."""
    return {"prompt": prompt_messages(record, where), **_meta(record)}


def to_kind_record(record: dict, where: str, kind: str | None = None) -> dict:
    """Normalise one record of `kind` (detected when None); SFT records go to `to_chat_record`."""
    kind = kind or detect_kind(record)
    if kind == "preference":
        return to_preference_record(record, where)
    if kind == "kto":
        return to_kto_record(record, where)
    if kind == "prompt":
        return to_prompt_record(record, where)
    return to_chat_record(record, where)


class KindGuard:
    """The one kind of record a file or a run holds: the first record sets it, another kind stops with its line."""

    def __init__(self, kind: str | None = None, where: str | None = None):
        self.kind, self.where = kind, where

    def check(self, kind: str, where: str) -> str:
        if self.kind is None:
            self.kind, self.where = kind, where
        elif kind != self.kind:
            raise UserError(
                f"{where}: {KIND_NAMES[kind][0]} among {KIND_NAMES[self.kind][1]} (the first is {self.where}); "
                f"keep one kind of record per file and per 'qlora prepare' run: move it to a file of its own"
            )
        return kind


def read_kind_lines(path: str | Path, errors: list[str]) -> tuple[str, list[tuple[int, dict]]]:
    """The kind of a JSONL file and its valid records with their line numbers; every bad line goes to
    `errors`, and a record of another kind than the first stops with a UserError."""
    guard, out = KindGuard(), []
    for lineno, line in iter_jsonl_lines(path):
        where = f"{path}:{lineno}"
        try:
            raw = parse_jsonl_line(line, where)
        except UserError as err:
            errors.append(str(err))
            continue
        kind = guard.check(detect_kind(raw), where)
        try:
            out.append((lineno, to_kind_record(raw, where, kind)))
        except UserError as err:
            errors.append(str(err))
    return guard.kind or "sft", out


def load_kind_records(path: str | None, what: str, kind: str) -> list[dict]:
    """The normalised records of a prepared JSONL file of `kind` (`what` names its config key); [] without a path."""
    if not path:
        return []
    if not Path(path).is_file():
        raise UserError(f"{what} '{path}' does not exist; run 'qlora prepare' first or set data.{what}")
    errors: list[str] = []
    found, records = read_kind_lines(path, errors)
    if errors:
        raise UserError(f"{errors[0]} (run 'qlora validate {path}' for every problem)")
    if not records:
        raise UserError(f"{what} '{path}' has no records")
    if found != kind:
        raise UserError(
            f"{what} '{path}' holds {KIND_NAMES[found][1]}; this run needs {KIND_NAMES[kind][1]} "
            f"(see docs/data.md for the shapes)"
        )
    return [rec for _, rec in records]


def kind_of(record: dict) -> str:
    """The kind of a normalised record."""
    if "chosen" in record:
        return "preference"
    if "completion" in record:
        return "kto"
    if "prompt" in record:
        return "prompt"
    return "sft"


def prompt_text(record: dict) -> str:
    """The text that identifies a normalised record's question, as `prompt_of` gives it for SFT records."""
    if "prompt" in record:
        return prompt_of({"messages": record["prompt"]})
    return prompt_of(record)


def record_key(record: dict) -> tuple:
    """What makes two normalised records duplicates (case- and whitespace-insensitive)."""
    kind = kind_of(record)
    prompt = normalise_key(prompt_text(record))
    if kind == "preference":
        return (prompt, normalise_key(record["chosen"]), normalise_key(record["rejected"]))
    if kind == "kto":
        return (prompt, normalise_key(record["completion"]), record["label"])
    if kind == "prompt":
        return (prompt,)
    return (prompt, normalise_key(answer_of(record)))


def answer_words(record: dict) -> int | None:
    """Words of the answer to learn (SFT answer, chosen, completion); None for a prompt-only record."""
    kind = kind_of(record)
    if kind == "prompt":
        return None
    if kind == "sft":
        return len(answer_of(record).split())
    return len(record["chosen" if kind == "preference" else "completion"].split())


def split_records(records: list[dict], ratio: float = 0.1, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """`split_holdout` for records of any kind: one prompt stays on one side, categories are stratified."""
    if all(kind_of(r) == "sft" for r in records):
        return split_holdout(records, ratio, seed)
    # split_holdout groups chat records by their prompt; stand-ins carry each record's prompt and category.
    stand_ins = [{"messages": r["prompt"], **({"category": r["category"]} if "category" in r else {})} for r in records]
    back = {id(s): r for s, r in zip(stand_ins, records)}
    train, holdout = split_holdout(stand_ins, ratio, seed)
    return [back[id(s)] for s in train], [back[id(s)] for s in holdout]
