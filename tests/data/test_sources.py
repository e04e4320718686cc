import pytest

from qlora_platform.data.sources import (
    csv_to_jsonl,
    document_records,
    document_sections,
    hf_dataset_to_jsonl,
    parse_mapping,
)
from qlora_platform.errors import UserError

BODY = (
    "This section explains the topic in enough words to be kept as a training record for the model here, "
    "and then some more words."
)


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("question,answer,extra\nWhat is X?,X is a thing.,1\nWhy Y?,Because.,2\n")
    rows = csv_to_jsonl(path, parse_mapping("instruction=question,output=answer"))
    assert rows[0] == (f"{path}:2", {"instruction": "What is X?", "output": "X is a thing."})
    assert len(rows) == 2


def test_csv_without_mapped_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("q,a\nx,y\n")
    with pytest.raises(UserError, match=r"column\(s\) question not in the CSV header \(q, a\).*--columns"):
        csv_to_jsonl(path, {"instruction": "question", "output": "a"})


def test_bad_mapping_syntax():
    with pytest.raises(UserError, match="FIELD=COLUMN"):
        parse_mapping("instruction")
    with pytest.raises(UserError, match="unknown field 'answer'"):
        parse_mapping("answer=a")


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": "a?", "a": "b."}, {"q": "c?", "a": "d."}]).save_to_disk(tmp_path / "ds")
    rows = hf_dataset_to_jsonl(str(tmp_path / "ds"), mapping={"instruction": "q", "output": "a"})
    assert [r for _, r in rows] == [{"instruction": "a?", "output": "b."}, {"instruction": "c?", "output": "d."}]
    with pytest.raises(UserError, match="has no column"):
        hf_dataset_to_jsonl(str(tmp_path / "ds"), mapping={"instruction": "nope"})


def test_html_split_by_headings_without_scripts(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        f"<html><head><title>Guide</title><script>var x=1;</script></head><body>"
        f"<nav>menu menu</nav><h1>Install</h1><p>{BODY}</p><h2>Usage</h2><p>{BODY}</p>"
        f"<ul><li>{BODY}</li></ul></body></html>"
    )
    title, sections = document_sections(path)
    assert title == "Guide"
    assert [h for h, _ in sections] == ["Install", "Usage"]
    assert "var x" not in sections[0][1] and "menu" not in sections[0][1]
    records = document_records(path, mode="qa")
    assert records[0][1]["instruction"] == "Guide: explain 'Install'." and records[0][1]["output"] == BODY
    assert records[0][1]["source"] == f"{path.name}#Install"  # the passage, for eval --rag


def test_markdown_and_text_sections_and_text_mode(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text(f"# First\n\n{BODY}\n\nSecond part\n-----------\n\n{BODY}\n\n## Tiny\n\nshort\n")
    records = document_records(path, mode="text")
    assert [r["text"].split("\n")[0] for _, r in records] == ["First", "Second part"]  # 'Tiny' is too short


def _minimal_pdf(text_lines: list[str]) -> bytes:
    """A valid one-page PDF with the given lines of text (Helvetica), built by hand."""
    stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({t}) '" for t in text_lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = "%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("latin-1")


def test_pdf_sections(tmp_path):
    path = tmp_path / "manual.pdf"
    path.write_bytes(_minimal_pdf(["1. Getting Started", BODY, "", "2. Advanced Usage", BODY]))
    title, sections = document_sections(path)
    assert [h for h, _ in sections] == ["Getting Started", "Advanced Usage"]
    assert "enough words" in sections[1][1]


def test_bad_documents(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        document_sections(tmp_path / "missing.pdf")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"not a pdf at all")
    with pytest.raises(UserError, match="cannot read PDF"):
        document_sections(broken)
    empty = tmp_path / "empty.txt"
    empty.write_text("too short")
    with pytest.raises(UserError, match="no section with at least"):
        document_records(empty)


def test_markdown_heading_is_linear_on_a_1mb_line(tmp_path):
    import time

    path = tmp_path / "big.md"
    # A heading with a long inner run of spaces, and one with a long run of #s: both made the old
    # pattern's lazy group retry the optional closing #s at every position (quadratic).
    path.write_text(
        "# Big document\n\n" + "# a" + " " * 1_000_000 + "b\n\n" + "## c" + "#" * 1_000_000 + "d\n\n" + BODY + "\n"
    )
    start = time.perf_counter()
    title, sections = document_sections(path)
    assert time.perf_counter() - start < 0.5
    assert title == "Big document"
    assert sections[-1][0].startswith("c#") and sections[-1][1] == BODY


def test_markdown_headings_strip_only_a_closing_hash_run(tmp_path):
    path = tmp_path / "langs.md"
    path.write_text(f"## C# basics ##\n\n{BODY}\n\n## Learn C#\n\n{BODY}\n")
    assert [h for h, _ in document_sections(path)[1]] == ["C# basics", "Learn C#"]


def test_markdown_title_is_the_first_level_one_heading(tmp_path):
    path = tmp_path / "install_notes.md"
    path.write_text(f"```sh\n# not a title: a shell comment\n```\n\n# Widget Guide\n\n{BODY}\n\n## Install\n\n{BODY}\n")
    title, _ = document_sections(path)
    assert title == "Widget Guide"
    records = [r for _, r in document_records(path, mode="qa")]
    assert records[-1]["instruction"] == "Widget Guide: explain 'Install'."
    assert records[-2]["instruction"] == "Summarise the introduction of Widget Guide."  # its own section
    untitled = tmp_path / "plain_notes.md"
    untitled.write_text(f"## Install\n\n{BODY}\n")
    assert document_sections(untitled)[0] == "plain notes"  # no '# ': file name


def test_hf_dataset_with_unknown_columns_gets_the_columns_hint(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a?", "response": "b."}]).save_to_disk(tmp_path / "ds")
    with pytest.raises(UserError, match=r"columns \(prompt, response\) .*--columns instruction=prompt,output=response"):
        hf_dataset_to_jsonl(str(tmp_path / "ds"))
