"""`qlora chat` (a streaming multi-turn REPL) and `qlora generate` (one prompt).

    qlora chat --adapter runs/demo/final_adapter [--temperature 0.7 --top-p 0.9 --max-tokens 256]
    qlora generate --adapter runs/demo/final_adapter --prompt "What does json.dumps do?"

In the REPL: `/reset` forgets the conversation, `/system TEXT` sets the system
prompt (and resets), `/tools` lists the declared tools, `/exit` (or Ctrl-D) leaves;
Ctrl-C stops the answer being written, not the session. Tokens are printed as they
are generated; a line with tokens/s follows each answer on stderr.

With `--tools FILE` (a JSON list of tool schemas) the prompt declares the tools. An
answer that calls them is shown as `[call] name({...})` lines, the person types each
call's result, and the model answers again from the results; an answer whose calls do
not parse or fit their schemas stays text, with the reason on stderr.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sys
from pathlib import Path

from ..data.tools import normalise_tools
from ..errors import UserError
from ..rag.prompt import format_sources, question_of
from .generation import single_turn
from .sampling import SamplingParams
from .tools import HeldText, ToolPlan

HELP = "commands: /reset  /system TEXT  /tools  /exit"


def load_tools(path: str) -> list[dict]:
    """The tool schemas of a `--tools` file (a JSON list), checked; a problem is one UserError line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--tools: '{path}' does not exist; give a JSON file with a list of tool schemas")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"--tools: '{path}' is not JSON ({reason}{where}); give a list of tool schemas") from None
    tools = normalise_tools(raw, f"--tools {path}")
    if not tools:
        raise UserError(f"--tools: '{path}' declares no tools; give a non-empty list of tool schemas")
    return tools


def describe_tools(tools: list[dict]) -> list[str]:
    """One line a tool: `name(arg, arg?): description` (`?`: optional)."""
    lines = []
    for tool in tools:
        fn = tool["function"]
        required = set(fn["parameters"].get("required", []))
        names = [a if a in required else f"{a}?" for a in fn["parameters"].get("properties", {})]
        lines.append(f"  {fn['name']}({', '.join(names)})" + (f": {fn['description']}" if fn["description"] else ""))
    return lines


def _stats(result) -> str:
    return (
        f"[{result.completion_tokens} tokens, {result.decode_tokens_per_s:.1f} tokens/s, "
        f"first token after {1000 * result.prefill_s:.0f} ms, {result.finish_reason}]"
    )


def _trim_history(
    engine, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None, reserve: int = 0
) -> list[int]:
    """The prompt of the conversation, dropping the oldest exchanges (a user message and the turns
    that answer it, calls and tool results included) when it would not fit the context with
    `reserve` tokens to spare (room for retrieved passages)."""
    while True:
        ids = engine.encode_chat(messages, tools=tools) if tools else engine.encode_chat(messages)
        if len(ids) + params.max_new_tokens + reserve <= engine.max_context:
            return ids
        first_turn = 1 if messages and messages[0]["role"] == "system" else 0
        next_user = next((i for i in range(first_turn + 1, len(messages)) if messages[i]["role"] == "user"), None)
        if next_user is None:
            raise UserError(
                f"the message has {len(ids)} tokens and max_tokens is {params.max_new_tokens}: "
                f"over the context of {engine.max_context}; shorten it or lower --max-tokens"
            )
        del messages[first_turn:next_user]


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
    tools: list[dict] | None = None,
    grounding=None,
) -> int:
    """`label` names what is answering (the adapter folder, or the model) in the banner; `tools`
    (normalised schemas, see `load_tools`) are declared to the model in every prompt; `grounding`
    (rag.prompt.Grounding) puts passages retrieved for each question into its prompt, and the
    answer is followed by their sources."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    err = err or (lambda s: print(s, file=sys.stderr))
    messages = [{"role": "system", "content": system}] if system else []
    if label is None:
        label = engine.model.config.name_or_path if hasattr(engine.model, "config") else "the model"
    extras = [f"{len(tools)} tool(s)"] if tools else []
    if grounding is not None:
        extras.append(f"retrieval from {grounding.retriever.describe()}")
    err(f"chat with {label}" + (f" and {' and '.join(extras)}" if extras else "") + f"; {HELP}")
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
        if text == "/tools":
            err("\n".join(["declared tools:", *describe_tools(tools)]) if tools else "(no tools: start with --tools)")
            continue
        if text.startswith("/"):
            err(f"unknown command {text.split()[0]}; {HELP}")
            continue
        messages.append({"role": "user", "content": text})
        # The model answers; while its answer holds calls, the person gives their results and it answers again.
        while _answer(engine, messages, params, tools, read, write, err, grounding):
            pass


def _grounded_prompt(engine, messages: list[dict], params: SamplingParams, tools, grounding):
    """(prompt ids, passages used, passages found) with retrieval. Old exchanges go first, so the
    passages keep their budget in a long conversation; ids are None when no passage fits beside the
    conversation, which is then trimmed as without retrieval."""
    with contextlib.suppress(UserError):  # the question alone leaves no room: answered without passages
        _trim_history(engine, messages, params, tools, reserve=grounding.settings.prompt_tokens)
    found = grounding.passages([question_of(messages)])[0]
    kwargs = {"tools": tools} if tools else {}
    ids, used = grounding.prompt(engine, messages, params.max_new_tokens, passages=found, **kwargs)
    return (ids if used else None), used, bool(found)


def _answer(engine, messages: list[dict], params: SamplingParams, tools, read, write, err, grounding=None) -> bool:
    """One answer of the model, appended to `messages`; True when it held calls whose results are
    now in `messages` too (the model answers again)."""
    prompt, used, found = None, [], False
    try:
        if grounding is not None:
            prompt, used, found = _grounded_prompt(engine, messages, params, tools, grounding)
        if prompt is None:
            prompt = _trim_history(engine, messages, params, tools)
    except UserError as error:
        if messages[-1]["role"] == "user":
            messages.pop()
        err(f"error: {error}")
        return False
    held = None
    if tools:
        held = HeldText("")
    pieces = []
    try:
        for piece in engine.stream(prompt, params):
            pieces.append(piece)
            shown = held.push(piece) if held is not None else piece
            if shown:
                write(shown)
        result = engine.last
    except KeyboardInterrupt:
        if held is not None:
            write(held.text[held.sent :])
        write("\n")
        err("(answer stopped)")
        messages.append({"role": "assistant", "content": "".join(pieces)})
        return False
    if held is None:
        messages.append({"role": "assistant", "content": result.text})
        write("\n")
        again = False
    else:
        again = _calls(messages, result, held, tools, read, write, err)
    if grounding is not None and not again:
        write(format_sources(used, found) + "\n")
    if held is None:
        err(_stats(result))
    return again


def _calls(messages: list[dict], result, held, tools: list[dict], read, write, err) -> bool:
    """The end of an answer with tools: its calls shown and their results asked for, or the held
    text shown as it is (with the reason when its calls did not parse or fit)."""
    answer = ToolPlan(tools, "auto", None, True).read(result.text)
    rest = held.rest(answer)
    if not answer.calls:
        write(rest + "\n")
        err(_stats(result))
        if answer.error:
            err(f"(not a valid tool call, kept as text: {answer.error})")
        messages.append({"role": "assistant", "content": result.text})
        return False
    shown = held.text[: held.sent] + rest
    write(rest + ("\n" if shown and not shown.endswith("\n") else ""))
    for c in answer.calls:
        write(f"[call] {c['function']['name']}({c['function']['arguments']})\n")
    err(_stats(result))
    calls: list[dict] = [
        {
            "id": f"call_{len(messages)}_{k}",
            "type": "function",
            "function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])},
        }
        for k, c in enumerate(answer.calls)
    ]
    results = []
    for call in calls:
        try:
            value = read(f"tool result for {call['function']['name']}> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            err("(no result given: the answer is kept as text; back to the prompt)")
            messages.append({"role": "assistant", "content": result.text})
            return False
        results.append(
            {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": value.strip()}
        )
    messages.append({"role": "assistant", "content": answer.content or "", "tool_calls": calls})
    messages.extend(results)
    return True


def generate_once(
    engine,
    prompt: str,
    params: SamplingParams,
    system: str | None = None,
    raw: bool = False,
    write=None,
    err=None,
    grounding=None,
) -> int:
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    err = err or (lambda s: print(s, file=sys.stderr))
    if not prompt.strip():
        raise UserError("--prompt is empty")
    used = None
    if grounding is not None:  # a chat prompt: the command line refuses --raw with --rag
        ids, used = grounding.prompt(engine, single_turn(prompt, system), params.max_new_tokens)
    else:
        ids = engine.encode_text(prompt) if raw else engine.encode_chat(single_turn(prompt, system))
    for piece in engine.stream(ids, params):
        write(piece)
    write("\n")
    if used is not None:
        write(format_sources(used, found=True) + "\n")
    err(_stats(engine.last))
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
