"""`qlora rag index` / `rag query` on an embedded ChromaDB: what a re-run skips, drops and adds, an
interrupted run, and bad input as one line each."""

from __future__ import annotations

import pytest

from qlora_platform.cli import main
from qlora_platform.errors import UserError
from qlora_platform.rag.embed import Embedder
from qlora_platform.rag.index import index_documents
from qlora_platform.rag.retrieve import Retriever
from qlora_platform.rag.settings import RagSettings
from qlora_platform.rag.store import open_store

QUIET = {"progress": False, "log": lambda *a: None}


def write_docs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "install.md").write_text("# Install\n\n## Linux\n\nRun the installer with sudo apt install widget.\n")
    (folder / "usage.md").write_text("# Usage\n\n## Starting\n\nStart the widget with widget --start.\n")
    (folder / "faq.txt").write_text("Why is the widget blue?\n\nBecause blue paint was cheapest in 1998.\n")
    return folder


def test_the_sample_documents_answer_their_own_questions(sample_index):
    retriever = Retriever.open(str(sample_index), RagSettings())
    assert retriever.generation.meta["embedding_model"] == "all-MiniLM-L6-v2" and retriever.generation.meta["complete"]
    questions = ["What does `json.dumps` do in Python?", "How do I use `shlex.split`?", "Explain `base64.b64encode`."]
    found = retriever.search(questions, 5, "keyword")
    # The json module's own page quotes json.dumps often: among four files it ranks first.
    assert [ps[0].heading for ps in found] == ["json", "shlex.split", "base64.b64encode"]
    assert "json.dumps" in [p.heading for p in found[0]]
    hybrid = retriever.search(questions[:2], 5, "hybrid")
    assert "json.dumps" in [p.heading for p in hybrid[0]] and hybrid[1][0].heading == "shlex.split"
    top = retriever.search(questions[:1], 5, "vector")[0]
    assert top[0].similarity == pytest.approx(top[0].score) and top[0].score > 0.5
    assert all(p.source.endswith(".html") for p in top)


def test_a_rerun_skips_unchanged_files_drops_gone_ones_and_reads_changed_ones(tmp_path, monkeypatch):
    docs, db = write_docs(tmp_path / "docs"), str(tmp_path / "db")
    first = index_documents([str(docs)], db, RagSettings(), **QUIET)
    assert (first["indexed"], first["unchanged"], first["removed"], first["chunks"]) == (3, 0, 0, 3)
    again = index_documents([str(docs)], db, RagSettings(), **QUIET)
    assert again["up_to_date"] and again["generation"] == first["generation"]

    (docs / "usage.md").write_text("# Usage\n\n## Stopping\n\nStop the widget with widget --halt-now.\n")
    (docs / "faq.txt").unlink()
    (docs / "new.md").write_text("# Colours\n\nThe widget also comes in green.\n")
    embedded: list[str] = []
    encode = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, texts, **kw: embedded.extend(texts) or encode(self, texts))
    third = index_documents([str(docs)], db, RagSettings(), **QUIET)
    assert (third["indexed"], third["unchanged"], third["removed"], third["chunks"]) == (2, 1, 1, 3)
    assert len(embedded) == 2  # install.md's chunk was copied with its embedding, not embedded again
    store = open_store(db)
    # The previous generation stays for readers that have not moved yet; the one before it goes.
    assert [g.number for g in store.generations("docs")] == [first["generation"], third["generation"]] == [1, 2]
    retriever = Retriever.open(db, RagSettings())
    assert retriever.search(["How do I stop the widget?"], 1)[0][0].heading == "Stopping"
    assert "Why is the widget blue?" not in " ".join(retriever.documents)

    # Other chunking settings: nothing can be reused.
    fourth = index_documents([str(docs)], db, RagSettings(chunk_tokens=100), **QUIET)
    assert (fourth["indexed"], fourth["unchanged"]) == (3, 0)
    assert [g.number for g in open_store(db).generations("docs")] == [2, 3]


def test_a_file_without_text_is_not_read_again(tmp_path):
    docs, db = write_docs(tmp_path / "docs"), str(tmp_path / "db")
    (docs / "blank.md").write_text("\n\n")
    first = index_documents([str(docs)], db, RagSettings(), **QUIET)
    assert first["empty"] == [str(docs / "blank.md")] and first["chunks"] == 3
    again = index_documents([str(docs)], db, RagSettings(), **QUIET)
    assert again["up_to_date"] and again["unchanged"] == 4


def test_a_running_retriever_follows_a_reindex(tmp_path, monkeypatch):
    docs, db = write_docs(tmp_path / "docs"), str(tmp_path / "db")
    index_documents([str(docs)], db, RagSettings(), **QUIET)
    live = Retriever.open(db, RagSettings())
    (docs / "usage.md").write_text("# Usage\n\n## Pausing\n\nPause the widget with widget --pause.\n")
    index_documents([str(docs)], db, RagSettings(), **QUIET)
    index_documents([str(docs / "usage.md"), str(docs / "install.md")], db, RagSettings(), **QUIET)
    # Two runs later the generation it read is gone; the next search moves to the newest one.
    monkeypatch.setattr(Retriever, "refresh_s", 0.0)
    assert live.search(["How do I pause the widget?"], 1, "vector")[0][0].heading == "Pausing"
    assert live.size == 2 and live.generation.number == 3


def test_chroma_failures_while_writing_are_one_line_and_leave_the_index(tmp_path, monkeypatch):
    from qlora_platform.rag.store import LOCK_FILE, Store

    docs, db = write_docs(tmp_path / "docs"), str(tmp_path / "db")
    index_documents([str(docs)], db, RagSettings(), **QUIET)
    (docs / "new.md").write_text("# New\n\nSomething new.\n")

    def broken(self, *a, **kw):
        raise RuntimeError("disk full\nmore detail")

    monkeypatch.setattr(Store, "publish", broken)
    with pytest.raises(UserError, match=r"failed while writing the index: disk full; the index is as it was"):
        index_documents([str(docs)], db, RagSettings(), **QUIET)
    monkeypatch.undo()
    assert Retriever.open(db, RagSettings()).size == 3

    import fcntl

    with (tmp_path / "db" / LOCK_FILE).open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another index run is writing"):
            index_documents([str(docs)], db, RagSettings(), **QUIET)


def test_an_interrupted_run_leaves_the_previous_index(tmp_path, monkeypatch):
    docs, db = write_docs(tmp_path / "docs"), str(tmp_path / "db")
    index_documents([str(docs)], db, RagSettings(), **QUIET)
    (docs / "usage.md").write_text("# Usage\n\n## Other\n\nSomething else entirely.\n")

    def interrupted(self, texts, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Embedder, "encode", interrupted)
    with pytest.raises(UserError, match="is as it was before this run") as err:
        index_documents([str(docs)], db, RagSettings(), **QUIET)
    assert err.value.exit_code == 130
    assert len(open_store(db).generations("docs")) == 2  # the complete one and the partial one
    monkeypatch.undo()
    assert Retriever.open(db, RagSettings()).search(["How do I start the widget?"], 1)[0][0].heading == "Starting"
    said: list[str] = []
    report = index_documents([str(docs)], db, RagSettings(), progress=False, log=said.append)
    assert said == ["removed 1 incomplete index generation(s) an interrupted run left"]
    assert report["indexed"] == 1 and [g.number for g in open_store(db).generations("docs")] == [1, 2]


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    docs = write_docs(tmp_path / "docs")
    db = tmp_path / "db"
    assert "does not exist" in one_line(capsys, ["rag", "index", "--input", str(tmp_path / "nope"), "--db", str(db)])
    (tmp_path / "table.csv").write_text("a,b\n")
    assert "unsupported document type" in one_line(
        capsys, ["rag", "index", "--input", str(tmp_path / "table.csv"), "--db", str(db)]
    )
    (docs / "broken.pdf").write_bytes(b"not a pdf at all")
    assert "broken.pdf: cannot read PDF" in one_line(capsys, ["rag", "index", "--input", str(docs), "--db", str(db)])
    assert not db.exists()  # a failed first run creates nothing
    (docs / "broken.pdf").unlink()
    assert "no index at" in one_line(capsys, ["rag", "query", "--db", str(tmp_path / "none"), "what?"])
    assert not (tmp_path / "none").exists()
    assert "give the index" in one_line(capsys, ["rag", "query", "what?"])
    assert "--collection" in one_line(
        capsys, ["rag", "index", "--input", str(docs), "--db", str(db), "--collection", "x"]
    )
    assert "--chunk-overlap" in one_line(
        capsys, ["rag", "index", "--input", str(docs), "--db", str(db), "--chunk-tokens", "32", "--chunk-overlap", "40"]
    )
    (tmp_path / "not-a-model").mkdir()
    assert "cannot load the embedding model" in one_line(
        capsys,
        ["rag", "index", "--input", str(docs), "--db", str(db), "--embedding-model", str(tmp_path / "not-a-model")],
    )
    assert "cannot reach the Chroma server" in one_line(
        capsys, ["rag", "query", "--chroma-url", "http://127.0.0.1:9", "what?"]
    )
    assert main(["rag", "index", "--input", str(docs), "--db", str(db)]) == 0
    capsys.readouterr()
    assert "no collection 'other'" in one_line(capsys, ["rag", "query", "--db", str(db), "--collection", "other", "q"])
    assert one_line(capsys, ["rag", "query", "--db", str(db), "q", "-k", "0"]).startswith("error: -k: ")
    assert "--collection 'a..b'" in one_line(
        capsys, ["rag", "index", "--input", str(docs), "--db", str(db), "--collection", "a..b"]
    )
    assert "--chroma-url takes http" in one_line(capsys, ["rag", "query", "--chroma-url", str(db), "q"])
    assert main(["rag", "query", "--db", str(db), "How do I install it on Linux?", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("[1] ") and "install.md § Linux" in out.splitlines()[0]
