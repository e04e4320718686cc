import json

from qlora_platform.data.validate import validate_file
from tests.conftest import chat, write_jsonl

LONG = " ".join(["word"] * 60)


def test_clean_file_passes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", LONG + f" {i}") for i in range(5)])
    report = validate_file(path, tokenizer, 512)
    assert report.ok and not report.warnings, report.format()


def test_findings_name_lines(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(chat("q1", "short answer")), "{broken", json.dumps(chat("q2", "  ")),
             json.dumps(chat("q1", "short answer")), json.dumps({"instruction": "x"}),
             json.dumps(chat("q3", LONG))]
    path.write_text("\n".join(lines) + "\n")
    held = write_jsonl(tmp_path / "e.jsonl", [chat("Q1 ", "other"), chat("fresh", "new")])
    report = validate_file(path, tokenizer, 64, held)
    text = report.format()
    assert not report.ok
    assert f"{path}:2: malformed JSON" in text
    assert f"{path}:3: assistant message 1 is empty" in text
    assert f"{path}:5: missing field 'output'" in text
    assert f"{held}:1: the same prompt is in {path}:1" in text
    assert "1 duplicate record(s)" in text and "repeats line 1" in text
    assert "under 50" in text
    assert "exceed max_seq_len 64" in text
