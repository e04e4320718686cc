"""An Ollama `Modelfile` for an exported GGUF, with the chat template in Ollama's Go syntax.

    text = modelfile("model-Q4_K_M.gguf", tokenizer.chat_template, system=None)

The family is recognised from the Jinja chat template's markers (ChatML, Mistral
[INST], Llama 3 headers, Phi-3); for an unknown template no TEMPLATE is written and
Ollama falls back to the template embedded in the GGUF metadata (a comment says so).

The system prompt comes from the data set, so it is checked before it is written:
Ollama's Modelfile has no escapes, and a triple-quoted block ends at the first line
that ends with three quotes, and the rest would be read as commands (`ADAPTER ...`).
`parse_modelfile` follows Ollama's own parser (parser/parser.go) and the written
file must parse back to exactly the commands meant; a prompt that cannot be
written safely is refused with the line that ends the block.
"""

from __future__ import annotations

from ..errors import UserError

FAMILIES = {
    "chatml": (
        "<|im_start|>",
        """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
""",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "llama3": (
        "<|start_header_id|>",
        """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>""",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "phi3": (
        "<|assistant|>",
        """{{ if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{ if .Prompt }}<|user|>
{{ .Prompt }}<|end|>
{{ end }}<|assistant|>
{{ .Response }}<|end|>
""",
        ["<|end|>", "<|user|>", "<|assistant|>"],
    ),
    "mistral": (
        "[INST]",
        """[INST] {{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }} [/INST] {{ .Response }}""",
        ["[INST]", "[/INST]", "</s>"],
    ),
}


def template_family(chat_template: str | None) -> str | None:
    for name, (marker, _, _) in FAMILIES.items():
        if chat_template and marker in chat_template:
            return name
    return None


COMMANDS = {
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
}


def _printable(ch: str) -> bool:
    # Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space.
    return ch == " " or ch.isprintable()


def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"""'):
        return (value[3:-3], True) if len(value) >= 6 and value.endswith('"""') else ("", False)
    if value.startswith('"'):
        return (value[1:-1], True) if len(value) >= 2 and value.endswith('"') else ("", False)
    return value, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, argument), ...] as Ollama's Modelfile parser reads `text`; raises ValueError where it fails."""
    commands, name, role, buf, state = [], "", "", "", "nil"
    for ch in text:
        if state == "nil":
            nxt, ch = ("comment", "") if ch == "#" else ("nil", "") if ch in " \t\r\n" else ("name", ch)
        elif state == "name":
            if ch.isascii() and ch.isalpha():
                nxt = "name"
            elif ch in " \t":
                nxt, ch = "value", ""
            else:
                raise ValueError(f"invalid command after '{buf}'")
        elif state == "value":
            nxt = "nil" if ch in " \t\r\n" else "value"
        elif state in ("parameter", "message"):
            if ch.isascii() and (ch.isalpha() or (state == "parameter" and (ch.isdigit() or ch == "_"))):
                nxt = state
            elif ch in " \t":
                nxt, ch = "value", ""
            else:
                raise ValueError(f"unexpected '{ch}' in a {state} name")
        else:  # comment
            nxt, ch = ("nil", "") if ch in "\r\n" else ("comment", "")
        if nxt != state:
            if state == "name":
                if buf.lower() not in COMMANDS:
                    raise ValueError(f"unknown command '{buf}'")
                name = {"from": "model"}.get(buf.lower(), buf.lower())
                if name in ("parameter", "message"):
                    nxt = name
            elif state == "parameter":
                name = buf
            elif state == "message":
                role = buf
            elif state == "value":
                value, ok = _unquote(buf.strip())
                if not ok or ch in " \t":
                    buf += ch
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf, state = "", nxt
        if ch and _printable(ch):
            buf += ch
    if state == "value":
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ValueError("unexpected end of file inside a quoted value")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    return commands


def system_command(system: str) -> str:
    """The SYSTEM command in triple quotes, or a UserError naming the line that would end the block early."""
    line = f'SYSTEM """{system}"""'
    kept = "".join(ch for ch in system if _printable(ch) or ch in "\t\r\n")
    try:
        parsed = parse_modelfile(f"FROM ./model.gguf\n{line}\n")
    except ValueError:
        parsed = []
    if parsed != [("model", "./model.gguf"), ("system", kept)]:
        lines = system.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        bad = next(
            (
                n
                for n, ln in enumerate(lines[:-1], 1)
                if "".join(c for c in ln if _printable(c) or c == "\t").rstrip().endswith('"""')
            ),
            None,
        )
        where = f'its line {bad} ends with three quotes (""")' if bad else "it cannot be quoted"
        raise UserError(
            f"the system prompt cannot be written into the Ollama Modelfile: {where}, which would "
            f'end the SYSTEM """...""" block early and let the rest act as Modelfile commands '
            f"(the format has no escapes); change that line of the system prompt in the data"
        )
    return line


def modelfile(gguf_name: str, chat_template: str | None, system: str | None = None, temperature: float = 0.7) -> str:
    family = template_family(chat_template)
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    if family:
        _, template, stops = FAMILIES[family]
        lines += [f"# chat template: {family} (from the tokenizer's template)", f'TEMPLATE """{template}"""', ""]
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    else:
        lines.append("# unknown chat template family: Ollama uses the template stored in the GGUF metadata")
    lines.append(f"PARAMETER temperature {temperature}")
    if system:
        lines.append(system_command(system))
    return "\n".join(lines) + "\n"
