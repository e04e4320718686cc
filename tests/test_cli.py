"""Bad input ends in one clear `error:` line and a non-zero exit, never a traceback."""
import json

import pytest

from qlora_platform.cli import main, parse_overrides
from qlora_platform.errors import UserError


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_malformed_jsonl(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    code, _, err = run(capsys, "prepare", "--input", str(path), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and f"{path}:2: malformed JSON" in one_error_line(err)


def test_missing_field_and_empty_output(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a"}) + "\n")
    code, _, err = run(capsys, "prepare", "--input", str(path), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "missing field 'output'" in one_error_line(err)
    path.write_text(json.dumps({"instruction": "a", "output": ""}) + "\n")
    code, _, err = run(capsys, "prepare", "--input", str(path), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "empty or whitespace" in one_error_line(err)


def test_csv_without_mapped_columns(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("q,a\nx,y\n")
    code, _, err = run(capsys, "prepare", "--input", str(path), "--columns", "instruction=question,output=a",
                       "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "column(s) question not in the CSV header" in one_error_line(err)


def test_unknown_key_wrong_type_and_missing_model(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--dry-run", "--learning_rat", "1e-4")
    assert code == 2 and "did you mean 'learning_rate'" in one_error_line(err)
    code, _, err = run(capsys, "train", "--dry-run", "--batch_size", "lots")
    assert code == 2 and "'training.batch_size'" in one_error_line(err)
    code, _, err = run(capsys, "train", "--dry-run", "--model.name", str(tmp_path / "no-model"))
    assert code == 2 and "does not exist" in one_error_line(err)
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "config file" in one_error_line(err)


def test_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"instruction": "q", "output": "a " * 60}) + "\n")
    code, out, _ = run(capsys, "validate", str(good), "--no-tokenizer")
    assert code == 0 and out.strip().endswith("OK")
    bad = tmp_path / "b.jsonl"
    bad.write_text("{oops\n")
    code, out, _ = run(capsys, "validate", str(bad), "--no-tokenizer")
    assert code == 1 and f"{bad}:1: malformed JSON" in out


def test_dry_run_prints_the_estimate(capsys):
    code, out, _ = run(capsys, "train", "--dry-run")
    assert code == 0 and "estimated peak memory" in out and "total" in out


def test_override_parsing():
    assert parse_overrides(["--a.b", "1", "--c=2"]) == {"a.b": "1", "c": "2"}
    with pytest.raises(UserError, match="has no value"):
        parse_overrides(["--lr"])
    with pytest.raises(UserError, match="unexpected argument 'x'"):
        parse_overrides(["x"])


def test_doctor_passes_here(capsys):
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and "4-bit layer" in out and "works" in out


def test_num_processes_below_one_is_one_clear_line(capsys):
    code, _, err = run(capsys, "train", "--num-processes", "0")
    assert code == 2 and "--num-processes must be at least 1" in one_error_line(err)
