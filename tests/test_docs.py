"""The house rules for docs and comments: a short README whose links resolve, and source comments
that give mechanisms and reasons, never run ids, lease names, commits or issue numbers."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "qlora_platform"

# What a run-citing comment looks like: a device run id (h100-..., real-h200-4), an issue or pull
# request number, or a commit hash named as such.
CITATION = re.compile(
    r"\b(?:real-)?[ha]\d{3}-[0-9a-z]+\b|\b(?:issue|task|PR)\s*#?\d+|#\d{2,}\b|\bcommit\s+[0-9a-f]{7,40}\b",
    re.IGNORECASE,
)


def comments_and_docstrings(path: Path):
    """(line, text) of every comment and every string that stands alone as a statement."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))
    previous = tokenize.NEWLINE
    for tok in tokens:
        standalone_string = tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT)
        if tok.type == tokenize.COMMENT or standalone_string:
            yield tok.start[0], tok.string
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            previous = tok.type


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme) <= 10_000, f"README.md has {len(readme)} characters; move depth to docs/"
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links, "README.md links nothing"
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert missing == []


def test_source_comments_cite_no_runs_commits_or_issues():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {text.strip()[:80]}"
        for path in sorted(SRC.rglob("*.py"))
        for line, text in comments_and_docstrings(path)
        if CITATION.search(text)
    ]
    assert offenders == [], "\n".join(offenders)


def test_the_citation_check_catches_what_it_is_for(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "# measured in run real-h200-4\nx = 1  # see issue 17\n"
        'def f():\n    """Fixed in commit 0c1e57098."""\n    return "h100-1 is data, not a comment"\n'
    )
    lines = [line for line, text in comments_and_docstrings(planted) if CITATION.search(text)]
    assert lines == [1, 2, 4]
