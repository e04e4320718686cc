"""The offline sample data set: a "Python standard library assistant".

Built from the running interpreter's own documentation, so it needs no network:
the pydoc topic texts (`pydoc_data.topics`), and the docstrings of the modules,
classes, functions and methods of a fixed list of widely used standard library
modules. Each pair asks about one object and answers with its signature and
documentation (trimmed at paragraph boundaries); pairs whose answer is too short
to teach anything are left out, and duplicates are removed.

    records = build_sample_records()    # [{"messages": [...], "category": ...}, ...]

`qlora prepare --sample` writes them as data/train.jsonl + data/eval.jsonl.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings

from .formats import normalise_key

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


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _pair(question: str, answer: str, category: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "category": category,
    }


def _topic_records(min_words: int, max_words: int) -> list[dict]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key]
        # The first line of a topic is its title, underlined with '*' signs.
        lines = text.strip().splitlines()
        title = lines[0].strip() if lines else key
        body = "\n".join(lines[2:]) if len(lines) > 2 and set(lines[1].strip()) <= {"*", "="} else text
        answer = _trim(inspect.cleandoc(body), max_words)
        if len(answer.split()) >= min_words:
            name = title[0].lower() + title[1:] if title[:2] != title[:2].upper() else title
            out.append(_pair(_pick(TOPIC_QUESTIONS, name), answer, "topic"))
    return out


def _object_records(min_words: int, max_words: int) -> list[dict]:
    out = []
    for modname in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(modname)
        except Exception:  # noqa: BLE001 - a module missing from this build is simply skipped
            continue
        doc = inspect.getdoc(module) or ""
        if len(doc.split()) >= min_words:
            out.append(_pair(_pick(MODULE_QUESTIONS, modname), _trim(doc, max_words), "module"))
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for attr in sorted(set(public)):
            obj = getattr(module, attr, None)
            if obj is None or getattr(obj, "__module__", None) not in (modname, module.__name__):
                continue  # re-exports are documented where they are defined
            full = f"{modname}.{attr}"
            if inspect.isclass(obj):
                doc = inspect.getdoc(obj) or ""
                if len(doc.split()) >= min_words:
                    answer = f"`{full}{_signature(obj)}`\n\n{_trim(doc, max_words)}"
                    out.append(_pair(_pick(CLASS_QUESTIONS, full), answer, "class"))
                for mname, meth in sorted(vars(obj).items()):
                    if mname.startswith("_") or not callable(meth):
                        continue
                    mdoc = inspect.getdoc(meth) or ""
                    if len(mdoc.split()) >= min_words:
                        answer = f"`{full}.{mname}{_signature(meth)}`\n\n{_trim(mdoc, max_words)}"
                        out.append(_pair(_pick(FUNCTION_QUESTIONS, f"{full}.{mname}"), answer, "method"))
            elif callable(obj):
                doc = inspect.getdoc(obj) or ""
                if len(doc.split()) >= min_words:
                    answer = f"`{full}{_signature(obj)}`\n\n{_trim(doc, max_words)}"
                    out.append(_pair(_pick(FUNCTION_QUESTIONS, full), answer, "function"))
    return out


def build_sample_records(min_words: int = 30, max_words: int = 160) -> list[dict]:
    """All pairs, deduplicated on question and on answer, in a stable order."""
    seen_q, seen_a, out = set(), set(), []
    for rec in _topic_records(min_words, max_words) + _object_records(min_words, max_words):
        if len(rec["messages"][2]["content"].split()) < min_words:
            continue  # trimming can leave less than the docstring had
        q = normalise_key(rec["messages"][1]["content"])
        a = normalise_key(rec["messages"][2]["content"].split("\n\n", 1)[-1])
        if q in seen_q or a in seen_a:
            continue
        seen_q.add(q)
        seen_a.add(a)
        out.append(rec)
    return out
