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
    lines = [
        json.dumps(chat("q1", "short answer")),
        "{broken",
        json.dumps(chat("q2", "  ")),
        json.dumps(chat("q1", "short answer")),
        json.dumps({"instruction": "x"}),
        json.dumps(chat("q3", LONG)),
    ]
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


def test_a_csv_or_a_folder_is_sent_to_prepare_in_one_line(tmp_path, capsys):
    import pytest

    from qlora_platform.cli import main
    from qlora_platform.errors import UserError

    csv = tmp_path / "faq.csv"
    csv.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(30)))
    with pytest.raises(UserError, match=rf"'{csv}' is a CSV file; .*run 'qlora prepare --input {csv}' first"):
        validate_file(csv)
    assert main(["validate", str(csv), "--no-tokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed JSON" not in err and "qlora prepare --input" in err

    listed = tmp_path / "records.json"
    listed.write_text(json.dumps([chat("q", "a")]))
    with pytest.raises(UserError, match="is a JSON list; .*qlora prepare --input"):
        validate_file(listed)

    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(UserError, match=rf"'{folder}' is a folder; .*pass a .jsonl file, or run 'qlora prepare"):
        validate_file(folder)
    write_jsonl(folder / "train.jsonl", [chat("q", LONG)])
    with pytest.raises(UserError, match=rf"is a folder; .*pass {folder / 'train.jsonl'}"):
        validate_file(folder)
    assert main(["validate", str(folder), "--no-tokenizer"]) == 2
    assert "does not exist" not in capsys.readouterr().err


def test_a_file_that_is_not_utf8_fails_in_one_line(tmp_path):
    import pytest

    from qlora_platform.errors import UserError

    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(chat("q", "a")).encode() + b"\n" + b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(UserError) as err:
        validate_file(path)
    assert str(err.value) == (
        f"{path}:2: not UTF-8 text (byte 0x89 at column 1); a data file is UTF-8 JSONL, one JSON object a line"
    )
