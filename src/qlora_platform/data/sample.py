"""The offline sample data set: a "Python standard library assistant".

Built from the running interpreter's own documentation, so it needs no network:
the pydoc topic texts (`pydoc_data.topics`), and the docstrings of the modules,
classes, functions and methods of a fixed list of widely used standard library
modules. Each pair asks about one object and answers with its documentation
(trimmed at paragraph boundaries), then its call signature (`SIGNATURE`): the
answer opens with what the object does, in prose, which is what a short answer
has room for. Pairs whose answer is too short to teach anything are left out, and
duplicates are removed.

    records = build_sample_records()    # [{"messages": [...], "category": ...}, ...]

`qlora prepare --sample` writes them as data/train.jsonl + data/eval.jsonl.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import inspect
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

from .formats import normalise_key

# The last paragraph of a function, method or class answer: `SIGNATURE` + `name(parameters)` in backticks.
# The answer leads with the documentation: a model trained on a few hundred pairs imitates how an
# answer opens, and an opening signature line of invented parameters drifts into invented code.
SIGNATURE = "Signature: "

TOPICS_FILE = "python-topics.html"
SYSTEM_PROMPT = "You are a helpful assistant for the Python standard library."

# Widely used, import-safe modules (no GUI, no side effects on import).
MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "collections.abc",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "ctypes",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "functools",
    "gc",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http",
    "http.client",
    "http.server",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "select",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "stat",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "sys",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
    "zoneinfo",
    "builtins",
    "binascii",
    "cmd",
    "code",
    "codeop",
    "colorsys",
    "compileall",
    "doctest",
    "email.message",
    "email.utils",
    "fileinput",
    "ftplib",
    "graphlib",
    "http.cookies",
    "http.cookiejar",
    "modulefinder",
    "netrc",
    "numbers",
    "optparse",
    "pdb",
    "poplib",
    "pstats",
    "profile",
    "py_compile",
    "pyclbr",
    "quopri",
    "reprlib",
    "runpy",
    "symtable",
    "sysconfig",
    "tabnanny",
    "tracemalloc",
    "wave",
    "xml.dom.minidom",
    "xml.sax",
    "xml.sax.saxutils",
    "zipimport",
    "asyncio.streams",
    "asyncio.subprocess",
    "asyncio.queues",
    "asyncio.locks",
    "asyncio.tasks",
    "asyncio.events",
    "email.parser",
    "email.policy",
    "json.decoder",
    "json.encoder",
    "logging.config",
    "multiprocessing.pool",
    "multiprocessing.managers",
    "concurrent.futures.thread",
    "importlib.resources",
    "importlib.metadata",
    "urllib.error",
    "urllib.robotparser",
    "wsgiref.simple_server",
    "wsgiref.util",
    "xmlrpc.client",
]

FUNCTION_QUESTIONS = [
    "What does `{name}` do in Python?",
    "How do I use `{name}`?",
    "Explain the function `{name}` from the standard library.",
    "What is `{name}` for, and how is it called?",
]
CLASS_QUESTIONS = [
    "What is the `{name}` class in Python?",
    "Explain `{name}` from the Python standard library.",
    "How do I use the `{name}` class?",
]
MODULE_QUESTIONS = [
    "What is the Python `{name}` module for?",
    "Give an overview of the `{name}` module.",
]
TOPIC_QUESTIONS = [
    "Explain {name} in Python.",
    "What should I know about {name} in Python?",
]


def _pick(templates: list[str], name: str) -> str:
    # Deterministic variety: the same object always gets the same phrasing.
    digest = int(hashlib.md5(name.encode()).hexdigest(), 16)
    return templates[digest % len(templates)].format(name=name)


def _trim(text: str, max_words: int) -> str:
    """Whole paragraphs up to max_words (at least the first paragraph, cut at a sentence)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, words = [], 0
    for p in paragraphs:
        n = len(p.split())
        if out and words + n > max_words:
            break
        if not out and n > max_words:
            sentences = re.split(r"(?<=[.!?])\s+", p)
            p = ""
            for s in sentences:
                if p and len((p + " " + s).split()) > max_words:
                    break
                p = f"{p} {s}".strip()
        out.append(p)
        words += len(p.split())
    return "\n\n".join(out)


# Paragraphs an answer leaves out: grammar productions, "See also" pointers, version notes.
_DROP_PARAGRAPH = re.compile(
    r"::=|^\s*(See also|Added in version|Changed in version|New in version|Deprecated since)", re.I
)
_BULLET = re.compile(r"^\s*([-*+]|\d+[.)])\s")
_HEADING_RULE = re.compile(r"^\s*([=\-~^*#])\1{2,}\s*$")
# A line laid out in columns: two or more spaces inside it (not after a full stop), an arrow, a comment.
_ALIGNED = re.compile(r"[^\s.!?:;] {2,}\S|-->|\s#\s")
_INTRO_WORDS = 8  # an intro sentence this short goes with the example it introduced


def _is_code(lines: list[str]) -> bool:
    """A doctest, or a block indented as a whole (how docstrings and the pydoc topics set code)."""
    return lines[0].lstrip().startswith(">>>") or all(line[:1].isspace() for line in lines)


def _is_aligned(lines: list[str]) -> bool:
    return len(lines) > 1 and any(_ALIGNED.search(line.strip()) for line in lines)


def _inline(text: str) -> str:
    """Markup a reader does not see on the rendered page: reST roles and double back-quotes,
    footnote marks (`[1]` after a space or punctuation, not an index like `a[0]`), and "(see ...)"
    cross-references."""
    text = re.sub(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"(?<![\w)\]'\"`])\s*\[\d+\]", "", text)
    return re.sub(r"\s*\((?:see|See) [^()]*\)", "", text)


def _prose(lines: list[str]) -> str:
    return re.sub(r"(?<=[.!?:;])\s{2,}", " ", _inline(" ".join(line.strip() for line in lines)))


def _items(lines: list[str]) -> list[str]:
    """A list as one line per item: an item starts at a bullet or at an unindented line, and its
    indented continuation lines join it (`name` over an indented description reads `name: ...`)."""
    items: list[list[str]] = []
    for line in lines:
        if _BULLET.match(line) or not line[:1].isspace() or not items:
            items.append([line.strip()])
        else:
            items[-1].append(line.strip())
    out = []
    for head, *rest in items:
        term = len(head.split()) <= 3 and not _BULLET.match(head) and not head.endswith((".", ":"))
        out.append(_prose([f"{head}:" if term and rest else head, *rest]))
    return out


def _drop_intro(out: list[str]) -> None:
    """The paragraph before a dropped example ends by introducing it ("... is equivalent to:"): it
    loses that last sentence; a paragraph of one short sentence goes whole, a longer one ends with
    a full stop instead."""
    if not out or not out[-1].endswith(":"):
        return
    sentences = re.split(r"(?<=[.!?])\s+", out[-1])
    if len(sentences) > 1:
        out[-1] = " ".join(sentences[:-1])
    elif len(out[-1].split()) <= _INTRO_WORDS:
        out.pop()
    else:
        out[-1] = out[-1][:-1] + "."


def _example(lines: list[str], max_lines: int) -> str | None:
    """A code block as an answer shows it: dedented, whole when it has at most `max_lines` lines; a
    longer doctest is cut before the statement (`>>>` line) that would pass the limit; any other
    long block is left out."""
    lines = [re.sub(r"^\s+(?=>>>)", "", line) for line in textwrap.dedent("\n".join(lines)).splitlines()]
    if len(lines) > max_lines:
        starts = [i for i, line in enumerate(lines) if line.startswith(">>>") and 0 < i <= max_lines]
        if not lines[0].startswith(">>>") or not starts:
            return None
        lines = lines[: starts[-1]]
    return "\n".join(lines)


def clean_doc(text: str, max_example_lines: int = 4) -> str:
    """Documentation as an answer reads: prose paragraphs unwrapped to one line each; lists one
    item a line; tables and other column layouts kept line by line; the first code example kept
    (dedented, a long doctest cut to its first statements within `max_example_lines` lines),
    every other listing dropped with the short sentence that introduced it; headings (a title
    over a rule of =, -, ~ ...), grammar productions ("::="), "See also" pointers and version
    notes dropped. Raw docstrings and pydoc topics are wrapped at 70-79 columns and carry
    reference-manual furniture; a small model trained on them copies the line breaks and the
    grammar instead of answering."""
    out: list[str] = []
    example_seen = False
    for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
        raw = [line.rstrip() for line in paragraph.splitlines()]
        rules = {i for i, line in enumerate(raw) if _HEADING_RULE.match(line)}
        lines = [line for i, line in enumerate(raw) if i not in rules and i + 1 not in rules and line.strip()]
        if not lines or _DROP_PARAGRAPH.search("\n".join(lines)):
            _drop_intro(out)
            continue
        if _is_code(lines):
            example = None if example_seen else _example(lines, max_example_lines)
            example_seen = True
            if example:
                out.append(example)
            else:
                _drop_intro(out)
            continue
        if _is_aligned(lines):
            out.append(textwrap.dedent("\n".join(lines)))
        elif any(_BULLET.match(line) or line[:1].isspace() for line in lines[1:]):
            out.append("\n".join(_items(lines)))
        else:
            out.append(_prose(lines))
    return "\n\n".join(p for p in out if p.strip())


def _signature(obj) -> str:
    """`(parameters)` of a callable, "" when it has none to show. A default without its own repr
    prints with its memory address (`<object object at 0x7f...>`, `<weakref at 0x7f...; to ...>`),
    which differs in every process: the address is dropped so that the set and its documents are
    the same on every run."""
    try:
        return re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return ""


def with_signature(body: str, call: str) -> str:
    """`body`, then the signature line of `call` (`name(parameters)`, no backticks): the layout
    `split_signature` reads back."""
    return f"{body}\n\n{SIGNATURE}`{call}`"


def split_signature(answer: str) -> tuple[str, str]:
    """(documentation, `name(parameters)` without backticks) of a sample answer; (answer, "") when it has
    no signature line."""
    body, _, footer = answer.rpartition("\n\n")
    if body and footer.startswith(f"{SIGNATURE}`") and footer.endswith("`"):
        return body, footer[len(SIGNATURE) + 1 : -1]
    return answer, ""


def _pair(question: str, answer: str, category: str, source: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "category": category,
        "source": source,
    }


@dataclass(frozen=True)
class Entry:
    """One documented object or topic: where the sample documents hold it (file and heading), its
    question, and its documentation whole (`doc`) with the signature line an answer ends with."""

    file: str
    heading: str
    category: str
    question: str
    signature: str  # name(args) for classes and callables, "" otherwise
    doc: str

    @property
    def source(self) -> str:
        return f"{self.file}#{self.heading}"


def _topic_entries() -> list[Entry]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key]
        # The first line of a topic is its title, underlined with '*' signs.
        lines = text.strip().splitlines()
        title = lines[0].strip() if lines else key
        body = "\n".join(lines[2:]) if len(lines) > 2 and set(lines[1].strip()) <= {"*", "="} else text
        name = title[0].lower() + title[1:] if title[:2] != title[:2].upper() else title
        question = _pick(TOPIC_QUESTIONS, name)
        out.append(Entry(TOPICS_FILE, " ".join(title.split()), "topic", question, "", inspect.cleandoc(body)))
    return out


def _object_entries() -> list[Entry]:
    out = []
    for modname in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(modname)
        except Exception:  # noqa: BLE001 - a module missing from this build is simply skipped
            continue
        file = f"{modname}.html"
        out.append(Entry(file, modname, "module", _pick(MODULE_QUESTIONS, modname), "", inspect.getdoc(module) or ""))
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for attr in sorted(set(public)):
            obj = getattr(module, attr, None)
            if obj is None or getattr(obj, "__module__", None) not in (modname, module.__name__):
                continue  # re-exports are documented where they are defined
            full = f"{modname}.{attr}"
            if inspect.isclass(obj):
                doc = inspect.getdoc(obj) or ""
                out.append(Entry(file, full, "class", _pick(CLASS_QUESTIONS, full), f"{full}{_signature(obj)}", doc))
                for mname, meth in sorted(vars(obj).items()):
                    if mname.startswith("_") or not callable(meth):
                        continue
                    if isinstance(getattr(meth, "__module__", None), str) and meth.__module__ != obj.__module__:
                        continue  # set on the class by another package (transformers adds logging.Logger.warning_once)
                    name = f"{full}.{mname}"
                    signature = f"{name}{_signature(meth)}"
                    mdoc = inspect.getdoc(meth) or ""
                    out.append(Entry(file, name, "method", _pick(FUNCTION_QUESTIONS, name), signature, mdoc))
            elif callable(obj):
                doc = inspect.getdoc(obj) or ""
                signature = f"{full}{_signature(obj)}"
                out.append(Entry(file, full, "function", _pick(FUNCTION_QUESTIONS, full), signature, doc))
    return out


def sample_entries() -> list[Entry]:
    """Every topic and documented object the sample set draws on, in a stable order."""
    return _topic_entries() + _object_entries()


def build_sample_records(min_words: int = 30, max_words: int = 160, entries: list[Entry] | None = None) -> list[dict]:
    """All pairs, deduplicated on question and on answer, in a stable order. Each names its
    `source`: the sample document and heading it was made from (`json.html#json.dumps`).
    `entries`: those of `sample_entries()`, when the caller has them already."""
    seen_q, seen_a, out = set(), set(), []
    for entry in sample_entries() if entries is None else entries:
        if len(entry.doc.split()) < min_words:
            continue
        body = _trim(clean_doc(entry.doc), max_words)
        answer = with_signature(body, entry.signature) if entry.signature else body
        if len(answer.split()) < min_words:
            continue  # trimming can leave less than the docstring had
        rec = _pair(entry.question, answer, entry.category, entry.source)
        q = normalise_key(entry.question)
        a = normalise_key(body)
        if q in seen_q or a in seen_a:
            continue
        seen_q.add(q)
        seen_a.add(a)
        out.append(rec)
    return out


def _document(title: str, entries: list[Entry]) -> str:
    parts = [
        "<!doctype html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title></head><body>',
    ]
    for e in entries:
        tag = "h1" if e.category == "module" else "h2"
        parts.append(f"<{tag}>{html.escape(e.heading)}</{tag}>")
        if e.signature:
            parts.append(f"<p><code>{html.escape(e.signature)}</code></p>")
        if e.doc.strip():
            parts.append(f"<pre>{html.escape(e.doc)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_sample_documents(folder: str | Path, entries: list[Entry] | None = None) -> list[Path]:
    """The documentation the sample set is made from, as HTML pages (one per module, and one of the
    language topics), whole rather than trimmed: what `qlora rag index` indexes for the sample domain."""
    by_file: dict[str, list[Entry]] = {}
    for entry in sample_entries() if entries is None else entries:
        if entry.doc.strip() or entry.signature:
            by_file.setdefault(entry.file, []).append(entry)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file, entries in by_file.items():
        module = file.removesuffix(".html")
        title = "Python language topics" if file == TOPICS_FILE else f"{module} (Python standard library)"
        path = folder / file
        path.write_text(_document(title, entries), encoding="utf-8")
        written.append(path)
    return written
