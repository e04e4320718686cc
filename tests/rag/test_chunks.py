"""Documents -> chunks: token windows with overlap inside a section, at word starts, with the heading kept."""

from __future__ import annotations

import json

import pytest

from qlora_platform.errors import UserError
from qlora_platform.rag.chunks import Chunk, chunk_document, read_document


def test_a_short_section_is_one_chunk_with_its_heading(embedder):
    chunks = chunk_document("a.md", "Guide", [("Install", "Run pip install foo.")], embedder.tokenizer, 200, 40, 256)
    assert chunks == [Chunk("a.md", "Guide", "Install", "Run pip install foo.", 0)]
    assert chunks[0].embedding_text() == "Guide: Install\nRun pip install foo."


def test_long_sections_are_windows_that_overlap_and_never_cross_a_section(embedder):
    words = [f"word{i}" for i in range(600)]  # each is two word pieces: "word" and "##<i>"
    chunks = chunk_document(
        "a.md", "T", [("One", " ".join(words)), ("Two", "short text here")], embedder.tokenizer, 64, 16, 256
    )
    first = [c for c in chunks if c.heading == "One"]
    assert len(first) > 10 and chunks[-1].heading == "Two" and chunks[-1].text == "short text here"
    assert [c.index for c in chunks] == list(range(len(chunks)))
    position = {w: i for i, w in enumerate(words)}
    spans = []
    for c in first:
        assert len(embedder.tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 64
        ws = c.text.split()
        assert all(w in position for w in ws)  # no chunk starts or ends inside a word
        spans.append((position[ws[0]], position[ws[-1]]))
    assert spans[0][0] == 0 and spans[-1][1] == 599
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a0 < b0 <= a1 < b1 and a1 - b0 + 1 >= 6  # about 16 tokens (8 words) of overlap


def test_the_window_leaves_room_for_the_heading(embedder):
    heading = "A very long heading " * 20
    chunks = chunk_document("a.md", "", [(heading, "x " * 2000)], embedder.tokenizer, 200, 0, 128)
    for c in chunks:
        assert len(embedder.tokenizer(c.embedding_text())["input_ids"]) <= 128


def test_overlap_must_be_smaller_than_the_window():
    from pydantic import ValidationError

    from qlora_platform.rag.settings import RagSettings

    with pytest.raises(ValidationError, match="--chunk-overlap"):
        RagSettings(chunk_tokens=32, chunk_overlap=32)


def test_a_long_heading_leaves_room_for_the_text(embedder):
    chunks = chunk_document("a.md", "", [("x" * 1000, "the body text " * 50)], embedder.tokenizer, 200, 0, 256)
    assert chunks[0].heading == "x" * 200
    assert len(embedder.tokenizer(chunks[0].embedding_text())["input_ids"]) <= 256


def test_jsonl_records_are_sections(tmp_path):
    path = tmp_path / "kb.jsonl"
    rows = [
        {"title": "Refunds", "text": "Refunds take five days."},
        {"messages": [{"role": "user", "content": "How do I reset?"}, {"role": "assistant", "content": "Hold it."}]},
        {"content": "No title here."},
        {"title": "empty", "text": "  "},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_document(path) == (
        "kb",
        [("Refunds", "Refunds take five days."), ("How do I reset?", "Hold it."), ("line 3", "No title here.")],
    )
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"kb.jsonl:2: malformed JSON"):
        read_document(path)


def test_html_headings_survive_inside_markup(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(
        "<html><head><title>Manual</title><script>var x = '<h2>no</h2>';</script></head><body>"
        "<nav><h2>Menu</h2><p>skip</p></nav>"
        '<h2 id="x"><a href="#x"><code>--flag</code>: does a thing</a></h2><p>Body &amp; more.</p></body></html>'
    )
    title, sections = read_document(page)
    assert title == "Manual" and ("--flag: does a thing", "Body & more.") in sections
    assert all(h != "Menu" for h, _ in sections)
