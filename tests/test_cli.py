"""Bad input ends in one clear `error:` line and a non-zero exit, never a traceback."""

import json

import pytest

from qlora_platform.cli import main, parse_overrides
from qlora_platform.errors import UserError
from tests.conftest import one_error_line, run_cli


def run(capsys, *argv):
    return run_cli(capsys, *argv)


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
    code, _, err = run(
        capsys,
        "prepare",
        "--input",
        str(path),
        "--columns",
        "instruction=question,output=a",
        "--out-dir",
        str(tmp_path / "o"),
    )
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


def test_short_prefixes_are_config_keys_not_flags(capsys):
    """--r is lora.r (argparse used to read it as --resume), and practitioners' names are aliases."""
    from qlora_platform.cli import build_parser
    from qlora_platform.config import load_config

    args, extra = build_parser().parse_known_args(["train", "--r", "8", "--lr", "1e-4"])
    assert not args.resume and extra == ["--r", "8", "--lr", "1e-4"]
    cfg = load_config(
        None,
        parse_overrides(
            extra
            + [
                "--num_train_epochs",
                "2",
                "--per_device_train_batch_size",
                "3",
                "--gradient_accumulation_steps",
                "5",
                "--lora_r",
                "4",
                "--lora_alpha",
                "8",
                "--output_dir",
                "o",
            ]
        ),
    )
    assert (cfg.lora.r, cfg.training.learning_rate, cfg.training.epochs) == (4, 1e-4, 2)
    assert (cfg.training.batch_size, cfg.training.grad_accum, cfg.lora.alpha, cfg.output.dir) == (3, 5, 8, "o")


def test_an_override_error_names_the_flag_not_the_yaml(capsys):
    code, _, err = run(capsys, "train", "--dry-run", "--config", "configs/smollm2-135m.yaml", "--lr", "-1")
    line = one_error_line(err)
    assert code == 2 and line.startswith("error: --lr:") and "smollm2-135m.yaml" not in line


def test_version_and_help_with_defaults(capsys):
    from qlora_platform import __version__

    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 3)" in capsys.readouterr().out
    code, out, _ = run(capsys, "train", "--help-config")
    assert code == 0 and "peak learning rate" in out and "[cosine | linear | constant]" in out


def test_run_paths_are_stored_absolute(tmp_path, monkeypatch):
    """A run's config names its files absolutely, so its commands work from any folder."""
    from qlora_platform.cli import _load_cfg, build_parser

    monkeypatch.chdir(tmp_path)
    args, extra = build_parser().parse_known_args(["train", "--train_file", "d/t.jsonl", "--output.dir", "r"])
    cfg = _load_cfg(args, extra)
    assert cfg.data.train_file == str(tmp_path / "d/t.jsonl") and cfg.output.dir == str(tmp_path / "r")
    assert cfg.data.eval_file == str(tmp_path / "data/eval.jsonl")


def test_eval_prompts_ship_with_the_package(tmp_path, monkeypatch):
    from qlora_platform.eval.keywords import DEFAULT_PROMPTS, load_prompt_file

    monkeypatch.chdir(tmp_path)
    assert len(load_prompt_file(DEFAULT_PROMPTS).prompts) == 26


def test_validate_on_a_binary_file_prints_one_line(tmp_path, capsys):
    binary = tmp_path / "image.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code, out, err = run(capsys, "validate", str(binary), "--no-tokenizer")
    assert code != 0 and "Traceback" not in err + out
    assert f"{binary}:2: not UTF-8 text (byte 0x80 at column 118)" in one_error_line(err)  # line 1 ends at 0x0a


def test_a_flat_yaml_config_trains_dry(tmp_path, capsys):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: bundled:smollm2-135m-instruct\nlearning_rate: 1.0e-4\nlora_r: 4\n")
    code, out, _ = run(capsys, "train", "--config", str(flat), "--dry-run")
    assert code == 0 and "learning_rate: 0.0001" in out and "  r: 4" in out
    flat.write_text("model: bundled:smollm2-135m-instruct\nlerning_rate: 1.0e-4\n")
    code, _, err = run(capsys, "train", "--config", str(flat), "--dry-run")
    assert code == 2 and "did you mean 'learning_rate'" in one_error_line(err)
