"""The index in ChromaDB: an embedded database in a folder, or a Chroma server.

    store = open_store("rag-index")                    # a folder (PersistentClient)
    store = open_store("http://127.0.0.1:8000")       # a server started with `chroma run`
    current = store.current("docs")                    # the complete generation, or None

An index run never changes the collection that queries read. It writes a new generation
(`docs--g4`), copying the chunks of unchanged files from the current one and adding the
new ones, and only when every chunk is in does it mark the generation complete; the
generations before the previous complete one are then dropped (the previous one stays, so
a server or chat that is still reading it keeps working until it moves to the new one). A
run that is interrupted leaves an incomplete generation that queries never read and the
next run removes, so the previous index stays usable. One index run writes a folder at a
time (a lock file). Vectors are stored with their own embeddings (Chroma's embedding
functions are not used) in a cosine space; telemetry is off; calls to a server time out.

Whatever Chroma raises once the database is open comes back as one UserError line
(`chroma_errors`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from .settings import INSTALL_HINT

_NAME = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9._-]{0,400}[a-zA-Z0-9])?")
_PAGE = 2000
HTTP_TIMEOUT_S = 30.0
LOCK_FILE = ".qlora-rag.lock"


@contextlib.contextmanager
def chroma_errors(location: str, doing: str) -> Iterator[None]:
    """Chroma's own exceptions (a server gone, a full disk, a name it refuses) as one UserError line."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - chromadb and httpx raise many types
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"the index at {location} failed while {doing}: {first}") from None


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _client(location: str, create: bool):
    try:
        import chromadb
        from chromadb.config import Settings
    except ImportError:
        raise UserError(f"retrieval needs chromadb: {INSTALL_HINT}") from None
    settings = Settings(anonymized_telemetry=False)
    if is_url(location):
        url = urlparse(location)
        if not url.hostname:
            raise UserError(f"'{location}' is not a server address; write http://HOST:PORT")
        port = url.port or (443 if url.scheme == "https" else 8000)
        try:
            client = chromadb.HttpClient(host=url.hostname, port=port, ssl=url.scheme == "https", settings=settings)
            _bound_http(client)
            client.heartbeat()
        except Exception as err:  # noqa: BLE001 - connection errors come as several types
            raise UserError(
                f"cannot reach the Chroma server at {location} ({str(err).splitlines()[0][:120]}); "
                f"start one with 'chroma run --path DIR --port {port}', or give a folder instead"
            ) from None
        return client
    path = Path(location)
    if not create and not (path / "chroma.sqlite3").is_file():
        raise UserError(f"no index at '{location}'; build one with: qlora rag index --input DOCS --db {location}")
    if path.exists() and not path.is_dir():
        raise UserError(f"'{location}' is a file; the index is a folder (or an http:// server address)")
    try:
        return chromadb.PersistentClient(path=str(path), settings=settings)
    except Exception as err:  # noqa: BLE001 - a locked, damaged or foreign folder
        raise UserError(f"cannot open the index folder '{location}' ({str(err).splitlines()[0][:160]})") from None


def _bound_http(client) -> None:
    """chromadb's HTTP client waits forever on a server that accepts and never answers; its
    session (a private attribute of chromadb 1.5) gets a timeout, so a hung server is an error."""
    import httpx

    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(HTTP_TIMEOUT_S)


@dataclass
class Generation:
    collection: object  # a chromadb Collection
    number: int
    meta: dict

    def count(self) -> int:
        return self.collection.count()  # type: ignore[attr-defined]

    def rows(self, include: list[str]):
        """Every chunk's id with the fields asked for, a page at a time."""
        offset = 0
        while True:
            page = self.collection.get(limit=_PAGE, offset=offset, include=include)  # type: ignore[attr-defined]
            if not page["ids"]:
                return
            yield page
            offset += len(page["ids"])


class Store:
    def __init__(self, location: str, client):
        self.location, self.client = location, client

    @staticmethod
    def check_name(name: str) -> None:
        """Chroma's rules for a collection name, with room for the generation suffix."""
        if not _NAME.fullmatch(name) or len(name) < 3 or ".." in name:
            raise UserError(
                f"--collection '{name}': use 3 to 400 letters, digits, '.', '_' or '-', starting and ending "
                f"with a letter or digit, without '..'"
            )

    def generations(self, name: str) -> list[Generation]:
        out = []
        for col in self.client.list_collections():
            m = re.fullmatch(re.escape(name) + r"--g(\d+)", col.name)
            if m:
                out.append(Generation(col, int(m.group(1)), dict(col.metadata or {})))
        return sorted(out, key=lambda g: g.number)

    def current(self, name: str) -> Generation | None:
        complete = [g for g in self.generations(name) if g.meta.get("complete")]
        if not complete:
            return None
        g = complete[-1]
        g.collection = self.client.get_collection(g.collection.name, embedding_function=None)
        return g

    def require(self, name: str) -> Generation:
        """The complete generation queries read, or one line saying how to build it."""
        g = self.current(name)
        if g is None:
            others = sorted({re.sub(r"--g\d+$", "", c.name) for c in self.client.list_collections()} - {name})
            hint = f" (it holds: {', '.join(others)}; pick one with --collection)" if others else ""
            raise UserError(
                f"the index at '{self.location}' has no collection '{name}'{hint}; build it with: "
                f"qlora rag index --input DOCS --db {self.location}"
            )
        if g.count() == 0:
            raise UserError(f"the index '{name}' at '{self.location}' is empty; index some documents first")
        return g

    def drop_incomplete(self, name: str) -> int:
        """Remove generations an interrupted run left behind; how many there were."""
        stale = [g for g in self.generations(name) if not g.meta.get("complete")]
        for g in stale:
            self.client.delete_collection(g.collection.name)  # type: ignore[attr-defined]
        return len(stale)

    def new_generation(self, name: str, meta: dict) -> Generation:
        number = max((g.number for g in self.generations(name)), default=0) + 1
        meta = {**meta, "complete": False, "generation": number}
        col = self.client.create_collection(
            f"{name}--g{number}", metadata=meta, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
        )
        return Generation(col, number, meta)

    def publish(self, g: Generation, name: str, meta: dict) -> None:
        """Mark `g` complete (queries read it from now on), then drop the generations before the
        previous complete one: that one stays for the readers that have not moved yet."""
        previous = self.current(name)
        g.meta = {**g.meta, **meta, "complete": True}
        g.collection.modify(metadata=g.meta)  # type: ignore[attr-defined]
        keep = previous.number if previous is not None else g.number
        for old in self.generations(name):
            if old.number < keep:
                self.client.delete_collection(old.collection.name)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """One index run at a time on a folder: a second one gets one line instead of a broken index."""
        if is_url(self.location):
            yield
            return
        import fcntl

        with (Path(self.location) / LOCK_FILE).open("w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"another index run is writing '{self.location}'; wait for it to finish") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def open_store(location: str, create: bool = False) -> Store:
    """The database at a folder or an http(s) server address; `create` allows a new folder."""
    if not location:
        raise UserError("give the index as a folder or an http://HOST:PORT Chroma server address")
    return Store(location, _client(location, create))


def exists(location: str) -> bool:
    """Whether the location may hold an index: a server, or a folder with a database."""
    return is_url(location) or (Path(location) / "chroma.sqlite3").is_file()
