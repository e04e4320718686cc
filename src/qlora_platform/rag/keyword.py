"""Keyword retrieval (BM25 through bm25s) and the rank fusion that merges it with vector search.

    bm25 = KeywordIndex([("json.dumps", "Serialize obj ..."), ...])
    bm25.search(["what does json.dumps do"], n=20)   # [[(row, score), ...]] best first, score > 0 only
    fuse([vector_rows, keyword_rows])               # reciprocal rank fusion: [(row, score), ...]

Terms are lower-cased runs of letters (any script), digits and underscores; a name joined by dots or
hyphens counts whole and by its parts, so `json.dumps` is `json.dumps`, `json` and `dumps`
(a question naming `json.dumps` matches its own section before every other `json` one) and
`--document-private-items` is found by the flag and by its words. A short list of English
function words is left out. A chunk's heading counts three times, as a field weight
(BM25F's idea): a heading names what its section is about. Reciprocal rank fusion scores a
row by the sum of 1 / (60 + rank) over the rankings that hold it (Cormack, Clarke and
Buettcher, SIGIR 2009; 60 is their constant).
"""

from __future__ import annotations

import re

from ..errors import UserError
from .settings import INSTALL_HINT

RRF_K = 60
HEADING_WEIGHT = 3
_TERM = re.compile(r"\w+(?:[.\-]\w+)*")
_PART = re.compile(r"[.\-]")
_FUNCTION_WORDS = (
    "a an and are as at be by can do does for from how i in is it its me my of on or should that the this "
    "to use used using was what when where which who why will with you your about into than then there"
)
STOPWORDS = frozenset(_FUNCTION_WORDS.split())


def terms(text: str) -> list[str]:
    out = []
    for word in _TERM.findall(text.lower()):
        parts = _PART.split(word)
        if len(parts) > 1:
            out.append(word)
        out += [p for p in parts if p and p not in STOPWORDS]
    return out


class KeywordIndex:
    def __init__(self, sections: list[tuple[str, str]]):
        """`sections`: (heading, text) of each chunk, in row order."""
        try:
            import bm25s
        except ImportError:
            raise UserError(f"keyword retrieval needs bm25s: {INSTALL_HINT}") from None

        self.size = len(sections)
        self.bm25 = bm25s.BM25()
        # bm25s takes pre-split documents; an empty one still holds its row (it matches nothing).
        docs = [terms(h) * HEADING_WEIGHT + terms(t) for h, t in sections]
        self.bm25.index([d or ["\x00"] for d in docs], show_progress=False)

    def search(self, queries: list[str], n: int) -> list[list[tuple[int, float]]]:
        n = min(n, self.size)
        out: list[list[tuple[int, float]]] = []
        for q in queries:
            words = terms(q)
            if not words or n == 0:
                out.append([])
                continue
            rows, scores = self.bm25.retrieve([words], k=n, show_progress=False)
            out.append([(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if s > 0])
        return out


def fuse(rankings: list[list[int]]) -> list[tuple[int, float]]:
    """Rows of several rankings (best first) by their reciprocal rank fusion score, best first."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking, 1):
            score[row] = score.get(row, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
