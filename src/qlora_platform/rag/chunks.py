"""Documents -> chunks: token windows with overlap that never cross a section, each keeping its
file, title and heading.

    title, sections = read_document(Path("manual.html"))          # the readers of `qlora prepare`
    chunks = chunk_document("manual.html", title, sections, tokenizer, size=200, overlap=40)

Lengths are counted in the embedding model's tokens, so a chunk is what the model reads
whole. A window ends where a word begins (within a quarter of its length), so no chunk
starts or ends inside a word. What is embedded is `embedding_text(chunk)`: the heading
(with the document's title where they differ) before the text, because a passage about
`json.dumps` rarely repeats the name its heading gives it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data.sources import DOC_SUFFIXES, document_sections
from ..errors import UserError

SUFFIXES = DOC_SUFFIXES | {".jsonl"}
_TEXT_KEYS = ("text", "content", "body", "passage")
_HEADING_KEYS = ("title", "heading", "question", "id")
# A heading longer than this (a long signature, a PDF line taken for a heading) would crowd the
# section's text out of what the embedding model reads.
HEADING_CHARS = 200


@dataclass(frozen=True)
class Chunk:
    source: str  # the file as the index run found it
    title: str
    heading: str
    text: str
    index: int  # position of the chunk within its file

    def embedding_text(self) -> str:
        head = self.heading if not self.title or self.heading == self.title else f"{self.title}: {self.heading}"
        return f"{head}\n{self.text}" if head else self.text


def _jsonl_sections(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """A JSONL file's records as sections: a text field (text, content, body or passage) under the
    record's title, heading or id; a chat record's answer under its question."""
    sections = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: malformed JSON ({err.msg}); fix the line or leave the file out") from None
            if not isinstance(obj, dict):
                continue
            messages = obj.get("messages")
            if isinstance(messages, list):
                turns = [m for m in messages if isinstance(m, dict)]
                question = next((m.get("content") for m in turns if m.get("role") == "user"), "")
                answers = [m.get("content") for m in turns if m.get("role") == "assistant"]
                text = "\n\n".join(a for a in answers if isinstance(a, str))
                heading = question if isinstance(question, str) else ""
            else:
                text = next((obj[k] for k in _TEXT_KEYS if isinstance(obj.get(k), str)), "")
                heading = next((str(obj[k]) for k in _HEADING_KEYS if obj.get(k) not in (None, "")), f"line {n}")
            if text.strip():
                sections.append((" ".join(heading.split()), text.strip()))
    return path.stem, sections


def read_document(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """(title, [(heading, text), ...]) of a PDF, HTML, Markdown, text or JSONL file; one UserError
    line when it cannot be read."""
    try:
        if path.suffix.lower() == ".jsonl":
            return _jsonl_sections(path)
        return document_sections(path)
    except UserError:
        raise
    except (OSError, UnicodeError, ValueError) as err:
        raise UserError(f"{path}: cannot read it ({err}); fix or remove the file") from None


def _word_start(offsets: list[tuple[int, int]], i: int, lowest: int) -> int:
    """The nearest token at or before `i` (not before `lowest`) that begins a word: one with a gap
    before it. `i` itself when none is found."""
    j = i
    while j > lowest and offsets[j][0] == offsets[j - 1][1]:
        j -= 1
    return j if j > lowest else i


def _windows(text: str, tokenizer, size: int, overlap: int) -> list[str]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    n = len(offsets)
    if n <= size:
        return [text.strip()] if text.strip() else []
    out, start = [], 0
    while start < n:
        end = min(start + size, n)
        if end < n:
            end = _word_start(offsets, end, start + 3 * size // 4)
        out.append(text[offsets[start][0] : offsets[end - 1][1]].strip())
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        start = _word_start(offsets, nxt, start + 1) if overlap else end
    return [t for t in out if t]


def chunk_document(
    source: str, title: str, sections: list[tuple[str, str]], tokenizer, size: int, overlap: int, max_tokens: int
) -> list[Chunk]:
    """The chunks of one document. `max_tokens` is what the embedding model reads (its special
    tokens included); a window shrinks so that the heading and the text fit it. `overlap` is
    below `size` (RagSettings checks it)."""
    out: list[Chunk] = []
    for heading, text in sections:
        heading = heading[:HEADING_CHARS]
        probe = Chunk(source, title, heading, "", 0).embedding_text()
        head_tokens = len(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]) if probe else 0
        window = max(16, min(size, max_tokens - 2 - head_tokens))
        for piece in _windows(text, tokenizer, window, min(overlap, window // 2)):
            out.append(Chunk(source, title, heading, piece, len(out)))
    return out
