"""Questions -> passages, from the complete generation of an index.

    retriever = Retriever.open("rag-index", RagSettings())
    passages = retriever.search(["What does json.dumps do?"], k=5)[0]   # best first
    print(passages[0].label(), passages[0].score)

The index's own embedding model embeds the questions (the name is in the index). Three
modes: `vector` (cosine similarity in Chroma), `keyword` (BM25 over the heading and text of
every chunk, built in memory when the retriever opens) and `hybrid` (the best `max(k, 5)` of
each, merged by reciprocal rank fusion: each side proposes its best, and what both propose
rises; deeper lists let passages that neither ranks high outvote one that one side ranks
first). A passage's `score` is the mode's own: the fused score, the cosine similarity or the
BM25 score; `similarity` is the cosine similarity wherever the vector search found the passage.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from ..errors import UserError
from .embed import Embedder, load_embedder
from .keyword import KeywordIndex, fuse
from .settings import DEFAULT_MODE, Mode, RagSettings
from .store import chroma_errors, open_store


@dataclass
class Passage:
    text: str
    source: str
    heading: str
    title: str
    score: float
    similarity: float | None = None

    def label(self) -> str:
        return f"{self.source} § {self.heading}" if self.heading else self.source

    def as_dict(self, n: int | None = None) -> dict:
        out = asdict(self)
        out["score"] = round(self.score, 4)
        out["similarity"] = None if self.similarity is None else round(self.similarity, 4)
        return {"n": n, **out} if n is not None else out


class Retriever:
    """The passages of one collection. It checks for a newer complete generation (a re-index)
    every `refresh_s` seconds and moves to it, so a running server or chat follows the index."""

    refresh_s = 10.0

    def __init__(self, location: str, store, name: str, device: str = "cpu", embedding_model: str | None = None):
        self.location, self.store, self.name, self.device = location, store, name, device
        self.requested_model = embedding_model  # None: the model the index was built with
        self.embedder: Embedder | None = None
        self.lock = threading.Lock()  # Chroma's client, the embedder and BM25 serve one search at a time
        with chroma_errors(location, "opening the index"):
            self._load(store.require(name))

    @classmethod
    def open(
        cls, location: str, settings: RagSettings, device: str = "cpu", embedding_model: str | None = None
    ) -> Retriever:
        """The collection `settings.collection` at a folder or server; `embedding_model` overrides the
        model the index names (its vectors' size must match)."""
        return cls(location, open_store(location), settings.collection, device, embedding_model)

    def _load(self, g) -> None:
        name = self.requested_model or str(g.meta.get("embedding_model", ""))
        if self.embedder is None or self.embedder.name != name:
            self.embedder = load_embedder(name, self.device)
        if g.meta.get("dim") not in (None, self.embedder.dim):
            raise UserError(
                f"the index holds {g.meta['dim']}-dimensional vectors but '{self.embedder.name}' makes "
                f"{self.embedder.dim}; index again with this model"
            )
        rows: dict = {"ids": [], "documents": [], "metadatas": []}
        for page in g.rows(["documents", "metadatas"]):
            for key in rows:
                rows[key] += page[key]
        self.generation = g
        self.ids, self.documents, self.metadatas = rows["ids"], rows["documents"], rows["metadatas"]
        self.row_of = {cid: i for i, cid in enumerate(self.ids)}
        self.keyword = KeywordIndex([(str(m.get("heading", "")), d) for m, d in zip(self.metadatas, self.documents)])
        self.checked = time.monotonic()

    def _refresh(self, force: bool = False) -> None:
        """Move to a newer complete generation, if there is one (under the lock)."""
        if not force and time.monotonic() - self.checked < self.refresh_s:
            return
        with chroma_errors(self.location, "looking for a newer index"):
            g = self.store.current(self.name)
            if g is not None and g.number != self.generation.number:
                self._load(g)
        self.checked = time.monotonic()

    @property
    def size(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        m = self.generation.meta
        files = m.get("files", "?")
        return f"{self.location} ({self.size} chunks of {files} file(s), {m.get('embedding_model')})"

    def _passage(self, i: int, score: float, similarity: float | None) -> Passage:
        m = self.metadatas[i]
        heading, title = str(m.get("heading", "")), str(m.get("title", ""))
        return Passage(self.documents[i], str(m["source"]), heading, title, score, similarity)

    def _vector(self, questions: list[str], n: int) -> list[list[tuple[int, float]]]:
        vectors = self.embedder.encode(questions)
        found = self.generation.collection.query(  # type: ignore[attr-defined]
            query_embeddings=vectors, n_results=min(n, self.size), include=["distances"]
        )
        return [
            [(self.row_of[cid], 1.0 - float(d)) for cid, d in zip(ids, dists) if cid in self.row_of]
            for ids, dists in zip(found["ids"], found["distances"])
        ]

    def search(self, questions: list[str], k: int, mode: Mode = DEFAULT_MODE) -> list[list[Passage]]:
        """The `k` best passages of each question, best first."""
        if not questions:
            return []
        n = max(k, 5) if mode == "hybrid" else k
        vector = None
        with self.lock:
            self._refresh()
            if mode in ("vector", "hybrid"):
                try:
                    vector = self._vector(questions, n)
                except Exception:  # noqa: BLE001 - the generation may be gone: one more try on the newest
                    self._refresh(force=True)
                    with chroma_errors(self.location, "searching"):
                        vector = self._vector(questions, n)
            keyword = self.keyword.search(questions, n) if mode in ("keyword", "hybrid") else None
        out = []
        for q in range(len(questions)):
            sims = dict(vector[q]) if vector is not None else {}
            if mode == "vector":
                ranked = vector[q][:k]  # type: ignore[index]
            elif mode == "keyword":
                ranked = keyword[q][:k]  # type: ignore[index]
            else:
                ranked = fuse([[r for r, _ in vector[q]], [r for r, _ in keyword[q]]])[:k]  # type: ignore[index]
            out.append([self._passage(row, score, sims.get(row)) for row, score in ranked])
        return out
