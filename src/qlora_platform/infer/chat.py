"""`qlora chat` (a streaming multi-turn REPL) and `qlora generate` (one prompt).

    qlora chat --adapter runs/demo/final_adapter [--temperature 0.7 --top-p 0.9 --max-tokens 256]
    qlora generate --adapter runs/demo/final_adapter --prompt "What does json.dumps do?"

In the REPL: `/reset` forgets the conversation, `/system TEXT` sets the system
prompt (and resets), `/exit` (or Ctrl-D) leaves; Ctrl-C stops the answer being
written, not the session. Tokens are printed as they are generated; a line
with tokens/s follows each answer on stderr.
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
from pathlib import Path

from ..errors import UserError
from .generation import single_turn
from .sampling import SamplingParams

HELP = "commands: /reset  /system TEXT  /exit"


def _stats(result) -> str:
    return (
        f"[{result.completion_tokens} tokens, {result.decode_tokens_per_s:.1f} tokens/s, "
        f"first token after {1000 * result.prefill_s:.0f} ms, {result.finish_reason}]"
    )


def _trim_history(engine, messages: list[dict], params: SamplingParams) -> list[int]:
    """The prompt of the conversation, dropping the oldest turns when it would not fit the context."""
    while True:
        ids = engine.encode_chat(messages)
        if len(ids) + params.max_new_tokens <= engine.max_context:
            return ids
        first_turn = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first_turn <= 1:
            raise UserError(
                f"the message has {len(ids)} tokens and max_tokens is {params.max_new_tokens}: "
                f"over the context of {engine.max_context}; shorten it or lower --max-tokens"
            )
        del messages[first_turn : first_turn + 2]


def line_editing(history_file: Path | None) -> None:
    """Arrow keys, line editing and a history kept across sessions for the REPL's input() (a
    terminal only; readline is missing on some platforms, where input stays plain)."""
    if not sys.stdin.isatty():
        return
    try:
        import atexit
        import readline
    except ImportError:
        return
    if history_file is None:
        return
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        if history_file.is_file():
            readline.read_history_file(history_file)
    except OSError:
        return
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, history_file))


def _save_history(readline, history_file: Path) -> None:
    with contextlib.suppress(OSError):
        readline.write_history_file(history_file)


def chat_repl(
    engine,
    params: SamplingParams,
    system: str | None = None,
    read=input,
    write=None,
    err=None,
    label: str | None = None,
) -> int:
    """`label` names what is answering (the adapter folder, or the model) in the banner."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    err = err or (lambda s: print(s, file=sys.stderr))
    messages = [{"role": "system", "content": system}] if system else []
    if label is None:
        label = engine.model.config.name_or_path if hasattr(engine.model, "config") else "the model"
    err(f"chat with {label}; {HELP}")
    while True:
        try:
            line = read("\n> ")
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            err("(conversation cleared)")
            continue
        if text.startswith("/system"):
            new_system = text[len("/system") :].strip()
            messages = [{"role": "system", "content": new_system}] if new_system else []
            err(f"(system prompt {'set' if new_system else 'removed'}; conversation cleared)")
            continue
        if text.startswith("/"):
            err(f"unknown command {text.split()[0]}; {HELP}")
            continue
        messages.append({"role": "user", "content": text})
        try:
            prompt = _trim_history(engine, messages, params)
        except UserError as error:
            messages.pop()
            err(f"error: {error}")
            continue
        pieces = []
        try:
            for piece in engine.stream(prompt, params):
                pieces.append(piece)
                write(piece)
            result = engine.last
        except KeyboardInterrupt:
            write("\n")
            err("(answer stopped)")
            messages.append({"role": "assistant", "content": "".join(pieces)})
            continue
        messages.append({"role": "assistant", "content": result.text})
        write("\n")
        err(_stats(result))


def generate_once(
    engine, prompt: str, params: SamplingParams, system: str | None = None, raw: bool = False, write=None, err=None
) -> int:
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    err = err or (lambda s: print(s, file=sys.stderr))
    if not prompt.strip():
        raise UserError("--prompt is empty")
    ids = engine.encode_text(prompt) if raw else engine.encode_chat(single_turn(prompt, system))
    for piece in engine.stream(ids, params):
        write(piece)
    write("\n")
    err(_stats(engine.last))
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
