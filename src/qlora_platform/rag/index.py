"""`qlora rag index`: documents -> chunks -> embeddings -> a new complete generation of the index.

    report = index_documents(["docs/"], "rag-index", RagSettings())
    print(format_index_report(report))

The index mirrors this run's inputs: a file whose content hash (SHA-256) and chunking
settings are those of the current generation keeps its chunks and embeddings (they are
copied, not computed again); a changed or new file is read, chunked and embedded; a file
the run no longer finds is dropped. Every file is read and chunked before anything is
written, so a file that cannot be read stops the run with one line and the index as it
was. Nothing changed: nothing is written. A file without text (a scanned PDF) is
remembered by its hash too, so it does not count as changed on every run.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..data.prepare import folder_inputs
from ..errors import UserError
from .chunks import SUFFIXES, Chunk, chunk_document, read_document
from .embed import Embedder, load_embedder
from .settings import RagSettings
from .store import Generation, Store, chroma_errors, exists, open_store

BATCH = 128
# Settings whose change invalidates every chunk (the embedding or the chunk boundaries differ).
_SHAPE_KEYS = ("embedding_model", "chunk_tokens", "chunk_overlap")


def input_files(inputs: list[str]) -> list[Path]:
    """The readable documents of the inputs (files, and folders searched recursively, hidden
    files left out), each once, in a stable order."""
    if not inputs:
        raise UserError("nothing to index: give --input FILE_OR_FOLDER (repeatable)")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = folder_inputs(path, SUFFIXES)
            if not found:
                raise UserError(f"'{raw}' holds no document ({', '.join(sorted(SUFFIXES))})")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise UserError(
                    f"{raw}: unsupported document type '{path.suffix}'; supported: {', '.join(sorted(SUFFIXES))}"
                )
            files.append(path)
        else:
            raise UserError(f"input '{raw}' does not exist")
    seen, out = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None


def _chunk_id(path: str, digest: str, index: int) -> str:
    return f"{hashlib.sha256(path.encode()).hexdigest()[:12]}-{digest[:12]}-{index}"


def _empty_files(g: Generation | None) -> dict[str, str]:
    """path -> content hash of the files without text that generation `g` was made from."""
    try:
        found = json.loads(str(g.meta.get("empty_files") or "{}")) if g is not None else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _current_files(g: Generation | None, shape: dict) -> dict[str, str]:
    """path -> content hash of the files the current generation was made from (those without text
    included), when its chunks were made with this run's settings (else none can be reused)."""
    if g is None or any(g.meta.get(k) != shape[k] for k in _SHAPE_KEYS):
        return {}
    files: dict[str, str] = dict(_empty_files(g))
    for page in g.rows(["metadatas"]):
        for m in page["metadatas"]:
            files[str(m["path"])] = str(m["file_sha"])
    return files


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled or total == 0, leave=False)


def _add_new(g: Generation, chunks: list[tuple[str, str, Chunk]], embedder: Embedder, progress: bool) -> float:
    """Embed and add the new chunks; the seconds spent embedding."""
    spent = 0.0
    with _progress(len(chunks), "embedding", progress) as bar:
        for k in range(0, len(chunks), BATCH):
            batch = chunks[k : k + BATCH]
            t = time.perf_counter()
            vectors = embedder.encode([c.embedding_text() for _, _, c in batch])
            spent += time.perf_counter() - t
            g.collection.add(  # type: ignore[attr-defined]
                ids=[_chunk_id(path, digest, c.index) for path, digest, c in batch],
                embeddings=vectors,
                documents=[c.text for _, _, c in batch],
                metadatas=[
                    {
                        "path": path,
                        "source": c.source,
                        "title": c.title,
                        "heading": c.heading,
                        "file_sha": digest,
                        "index": c.index,
                    }
                    for path, digest, c in batch
                ],
            )
            bar.update(len(batch))
    return spent


def _copy_kept(old: Generation, new: Generation, kept: set[str]) -> int:
    """Copy the chunks of unchanged files, embeddings included; how many."""
    copied = 0
    for page in old.rows(["embeddings", "documents", "metadatas"]):
        rows = [i for i, m in enumerate(page["metadatas"]) if str(m["path"]) in kept]
        for k in range(0, len(rows), BATCH):
            part = rows[k : k + BATCH]  # a server's largest batch may be far below a page
            new.collection.add(  # type: ignore[attr-defined]
                ids=[page["ids"][i] for i in part],
                embeddings=[page["embeddings"][i] for i in part],
                documents=[page["documents"][i] for i in part],
                metadatas=[page["metadatas"][i] for i in part],
            )
        copied += len(rows)
    return copied


def index_documents(
    inputs: list[str],
    location: str,
    settings: RagSettings,
    device: str = "cpu",
    progress: bool = True,
    log=print,
) -> dict:
    start = time.perf_counter()
    Store.check_name(settings.collection)
    files = input_files(inputs)
    embedder = load_embedder(settings.embedding_model, device)
    shape = {
        "embedding_model": settings.embedding_model,
        "chunk_tokens": settings.chunk_tokens,
        "chunk_overlap": settings.chunk_overlap,
    }
    # A folder without a database is created only once there is something to write.
    store = open_store(location) if exists(location) else None
    with chroma_errors(location, "reading the index"):
        current = store.current(settings.collection) if store is not None else None
        held = _current_files(current, shape)
    digests = {str(f.resolve()): (f, _digest(f)) for f in files}
    kept = {p for p, (_, d) in digests.items() if held.get(p) == d}
    changed = [(p, f, d) for p, (f, d) in digests.items() if p not in kept]
    gone = sorted(set(held) - set(digests))
    report = {
        "location": location,
        "collection": settings.collection,
        "embedding_model": settings.embedding_model,
        "files": len(files),
        "unchanged": len(kept),
        "indexed": len(changed),
        "removed": len(gone),
        "empty": [],
        "chunks_added": 0,
        "embed_seconds": 0.0,
    }
    if current is not None and not changed and not gone:
        with chroma_errors(location, "reading the index"):
            report.update(chunks=current.count(), generation=current.number, up_to_date=True)
        report["seconds"] = round(time.perf_counter() - start, 2)
        return report

    # Read and chunk every changed file first: a file that cannot be read stops the run before any write.
    new_chunks: list[tuple[str, str, Chunk]] = []
    were_empty = _empty_files(current) if held else {}
    empty: dict[str, str] = {p: held[p] for p in kept if p in were_empty}
    for path, f, digest in changed:
        title, sections = read_document(f)
        size, overlap = settings.chunk_tokens, settings.chunk_overlap
        chunks = chunk_document(str(f), title, sections, embedder.tokenizer, size, overlap, embedder.max_tokens)
        if not chunks:
            report["empty"].append(str(f))
            empty[path] = digest
        new_chunks += [(path, digest, c) for c in chunks]
    if not new_chunks and len(empty) == len(digests):
        raise UserError(f"no text found in {len(files)} file(s): nothing to index (are they scanned PDFs or empty?)")

    if store is None:
        store = open_store(location, create=True)
    meta = {
        **shape,
        "qlora_rag": 1,
        "dim": embedder.dim,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        # Files without text have no chunk to remember them by: their hashes keep them "unchanged".
        "empty_files": json.dumps(empty),
    }
    published = False
    try:
        with store.writing(), chroma_errors(location, "writing the index"):
            dropped = store.drop_incomplete(settings.collection)
            if dropped:
                log(f"removed {dropped} incomplete index generation(s) an interrupted run left")
            new = store.new_generation(settings.collection, meta)
            report["embed_seconds"] = round(_add_new(new, new_chunks, embedder, progress), 2)
            copied = _copy_kept(current, new, kept - set(empty)) if current is not None and kept else 0
            total = len(new_chunks) + copied
            store.publish(new, settings.collection, {"files": len(files) - len(empty), "chunks": total})
            published = True
    except KeyboardInterrupt:
        if published:
            raise UserError(f"interrupted once the new index at '{location}' was complete; it is in use", 130) from None
        raise UserError(
            f"interrupted: the index at '{location}' is as it was before this run (the partial one is removed "
            f"by the next run)",
            130,
        ) from None
    except UserError as err:
        if published:
            raise
        raise UserError(f"{err}; the index is as it was before this run") from None
    report.update(chunks=total, chunks_added=len(new_chunks), generation=new.number, up_to_date=False)
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["chunks_per_s"] = round(len(new_chunks) / report["seconds"], 1) if report["seconds"] else None
    return report


def format_index_report(report: dict) -> str:
    where = f"'{report['collection']}' at {report['location']}"
    if report.get("up_to_date"):
        return (
            f"index {where} is up to date: {report['files']} file(s) unchanged, {report['chunks']} chunks "
            f"(generation {report['generation']})"
        )
    lines = [
        f"indexed {where}: {report['indexed']} file(s) read and embedded, {report['unchanged']} unchanged, "
        f"{report['removed']} removed; {report['chunks']} chunks in all ({report['chunks_added']} new) "
        f"with {report['embedding_model']}",
        f"took {report['seconds']} s ({report['chunks_per_s']} new chunks/s; embedding {report['embed_seconds']} s)",
    ]
    for f in report["empty"]:
        lines.append(f"  no text in {f} (skipped)")
    return "\n".join(lines)
