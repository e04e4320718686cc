"""Raw sources turned into records: CSV, Hugging Face datasets, PDF/HTML/text documents.

    csv_to_jsonl("faq.csv", {"instruction": "question", "output": "answer"})
    hf_dataset_to_jsonl("tatsu-lab/alpaca", split="train")   # or a local saved dataset
    document_records("manual.pdf", mode="qa")                 # or mode="text"

Each returns a list of (where, record) pairs, `where` being "file:line" or
"file:section N", so later validation errors still point at the source.
Documents are split at headings (HTML h1-h6, Markdown #, numbered or
underlined headings in text/PDF); `qa` mode turns each section into a question
about its heading with the section as the answer, `text` mode keeps plain text
records for continued pre-training. A document's title is its HTML <title> or
its first Markdown `# ` heading, else its file name.
"""

from __future__ import annotations

import csv
import re
from html.parser import HTMLParser
from pathlib import Path

from ..errors import UserError

DOC_SUFFIXES = {".pdf", ".html", ".htm", ".txt", ".md", ".markdown", ".rst"}


def parse_mapping(text: str | None) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        if "=" not in part:
            raise UserError(f"--columns: '{part}' is not FIELD=COLUMN (e.g. instruction=question,output=answer)")
        field, column = (s.strip() for s in part.split("=", 1))
        if field not in ("instruction", "input", "output", "system", "text", "category"):
            raise UserError(
                f"--columns: unknown field '{field}'; fields are instruction, input, output, system, text, category"
            )
        mapping[field] = column
    return mapping


# Column names that commonly hold the prompt and the answer, for the --columns hint.
_PROMPT_NAMES = ("instruction", "prompt", "question", "query", "input", "user", "q")
_ANSWER_NAMES = ("output", "response", "answer", "completion", "reply", "assistant", "target", "a")


def columns_hint(columns: list[str]) -> str:
    """'--columns instruction=COL,output=COL', filled in with the columns that look like a prompt and an answer."""
    lower = {c.lower(): c for c in columns}
    prompt = next((lower[n] for n in _PROMPT_NAMES if n in lower), "COL")
    answer = next((lower[n] for n in _ANSWER_NAMES if n in lower and lower[n] != prompt), "COL")
    return f"--columns instruction={prompt},output={answer}"


def _apply_mapping(row: dict, mapping: dict[str, str]) -> dict:
    if not mapping:
        return dict(row)
    return {field: row.get(column) for field, column in mapping.items()}


def csv_to_jsonl(path: str | Path, mapping: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """Rows of a CSV file as alpaca/text records; `mapping` names the CSV column of each field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file '{path}' does not exist")
    mapping = mapping or {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        wanted = mapping or {f: f for f in ("instruction", "input", "output", "text") if f in header}
        missing = [col for col in wanted.values() if col not in header]
        if missing or not wanted:
            raise UserError(
                f"{path}: column(s) {', '.join(missing) or 'instruction/output'} not in the CSV "
                f"header ({', '.join(header) or 'empty'}); map them with {columns_hint(header)}"
            )
        out = []
        for i, row in enumerate(reader, 2):  # line 1 is the header
            out.append((f"{path}:{i}", _apply_mapping(row, wanted)))
    return out


def hf_dataset_to_jsonl(
    name_or_path: str, split: str = "train", mapping: dict[str, str] | None = None
) -> list[tuple[str, dict]]:
    """Records of a Hugging Face dataset: a hub id, a `save_to_disk` folder, or a data file."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading Hugging Face datasets needs the 'datasets' package: pip install datasets") from None
    path = Path(name_or_path)
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise UserError(f"'{path}': unsupported dataset file type '{path.suffix}'")
            ds = datasets.load_dataset(kind, data_files=str(path))
        else:
            ds = datasets.load_dataset(name_or_path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types
        raise UserError(f"cannot load dataset '{name_or_path}': {str(err).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset '{name_or_path}' has no split '{split}'; splits: {', '.join(ds)}")
        ds = ds[split]
    if mapping:
        missing = [c for c in mapping.values() if c not in ds.column_names]
        if missing:
            raise UserError(
                f"dataset '{name_or_path}' has no column(s) {', '.join(missing)}; columns: {', '.join(ds.column_names)}"
            )
    else:
        from .formats import detect_format

        if detect_format(dict.fromkeys(ds.column_names)) is None:
            raise UserError(
                f"dataset '{name_or_path}': its columns ({', '.join(ds.column_names) or 'none'}) are "
                f"no known record format; map them with {columns_hint(ds.column_names)}"
            )
    return [(f"{name_or_path}[{i}]", _apply_mapping(row, mapping or {})) for i, row in enumerate(ds)]


# --- documents -----------------------------------------------------------------------


class _HTMLSections(HTMLParser):
    """Collect (heading, text) sections from HTML, skipping scripts, styles and navigation."""

    SKIP = {"script", "style", "nav", "header", "footer", "noscript", "svg"}
    BLOCK = {"p", "div", "li", "br", "pre", "tr", "section", "article", "blockquote", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [["", ""]]
        self.title = ""
        self._skip = 0
        self._heading: list[str] | None = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = []
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCK:
            self.sections[-1][1] += "\n"

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        elif re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            self.sections.append([" ".join("".join(self._heading).split()), ""])
            self._heading = None
        elif tag == "title":
            self._in_title = False
        elif tag in self.BLOCK:
            self.sections[-1][1] += "\n"

    def handle_data(self, data):
        if self._skip:
            return
        if self._in_title:
            self.title += data
        elif self._heading is not None:
            self._heading.append(data)
        else:
            self.sections[-1][1] += data


_MARKDOWN_HEADING = re.compile(r"(#{1,6})\s")
_NUMBERED_HEADING = re.compile(r"^(?:\d+(?:\.\d+)*\.?|[IVX]+\.)\s+([A-Z][^.!?]{2,80})$")  # 1.2 Numbered heading


def _markdown_heading(line: str) -> tuple[int, str] | None:
    """(level, text) of an ATX heading ('## Text ##'), or None. Plain string operations keep it linear in
    the line length (a backtracking pattern for the optional closing #s is quadratic on long lines)."""
    m = _MARKDOWN_HEADING.match(line)
    if not m:
        return None
    text = line[m.end() :].strip()
    closed = text.rstrip("#")
    if not closed or closed[-1].isspace():  # a closing run of #s counts only after a space
        text = closed.rstrip()
    return len(m.group(1)), text


def _markdown_title(text: str) -> str | None:
    """The first level-1 heading ('# Title') outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            found = _markdown_heading(stripped)
            if found and found[0] == 1 and found[1]:
                return found[1]
    return None


def _text_sections(text: str) -> list[tuple[str, str]]:
    lines = text.splitlines()
    sections: list[list] = [["", []]]
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        found = _markdown_heading(line.strip())
        heading = found[1] if found else None
        if heading is None:
            m = _NUMBERED_HEADING.match(line.strip())
            heading = m.group(1) if m else None
        if heading is None and line.strip() and re.fullmatch(r"[=\-~^]{3,}", nxt) and len(nxt) >= len(line.strip()) - 2:
            heading, i = line.strip(), i + 1  # underlined (reST / setext)
        if heading:
            sections.append([heading.strip(), []])
        else:
            sections[-1][1].append(line)
        i += 1
    return [(h, "\n".join(body)) for h, body in sections]


def _clean(text: str) -> str:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise UserError("reading PDF needs the 'pypdf' package: pip install pypdf") from None
    try:
        reader = PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError) as err:
        raise UserError(f"{path}: cannot read PDF ({err}); is the file a valid, unencrypted PDF?") from None


def document_sections(path: str | Path) -> tuple[str, list[tuple[str, str]]]:
    """(title, [(heading, text), ...]) of a PDF, HTML, Markdown or text document."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"document '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix not in DOC_SUFFIXES:
        raise UserError(f"{path}: unsupported document type '{suffix}'; supported: {', '.join(sorted(DOC_SUFFIXES))}")
    title = path.stem.replace("_", " ").replace("-", " ")
    if suffix in (".html", ".htm"):
        parser = _HTMLSections()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        title = " ".join(parser.title.split()) or title
        sections = [(h, t) for h, t in parser.sections]
    else:
        text = _pdf_text(path) if suffix == ".pdf" else path.read_text(encoding="utf-8", errors="replace")
        if suffix in (".md", ".markdown"):
            title = _markdown_title(text) or title
        sections = _text_sections(text)
    cleaned = [(h, _clean(t)) for h, t in sections]
    return title, [(h, t) for h, t in cleaned if t]


def document_records(path: str | Path, mode: str = "qa", min_words: int = 20) -> list[tuple[str, dict]]:
    """Instruction pairs (`qa`) or plain-text records (`text`) from a document's sections."""
    if mode not in ("qa", "text"):
        raise UserError(f"--doc-mode must be 'qa' or 'text', got '{mode}'")
    title, sections = document_sections(path)
    out = []
    for n, (heading, body) in enumerate(sections, 1):
        if len(body.split()) < min_words:
            continue  # too short to teach anything; counted by the caller as skipped sections
        where = f"{path}:section {n}"
        if mode == "text":
            out.append((where, {"text": f"{heading}\n\n{body}" if heading else body, "source": str(path)}))
        elif heading and heading != title:
            record = {"instruction": f"{title}: explain '{heading}'.", "output": body, "category": Path(path).name}
            # The passage the answer comes from, for `qlora eval --rag` over an index of the same document.
            out.append((where, {**record, "source": f"{Path(path).name}#{heading}"}))
        else:
            out.append(
                (
                    where,
                    {
                        "instruction": f"Summarise the introduction of {title}.",
                        "output": body,
                        "category": Path(path).name,
                    },
                )
            )
    if not out:
        raise UserError(f"{path}: no section with at least {min_words} words of text was found")
    return out
