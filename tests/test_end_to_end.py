"""The pipeline through the CLI on the bundled SmolLM2-135M-Instruct: prepare, train, resume, export, generate."""

import json

import pytest

from qlora_platform.cli import main


@pytest.mark.slow
def test_prepare_train_resume_export_on_the_bundled_model(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["prepare", "--sample", "--out-dir", str(data)]) == 0
    # A small slice keeps the test in seconds: the first 24 training pairs, 8 holdout pairs.
    for name, n in (("train.jsonl", 24), ("eval.jsonl", 8)):
        lines = (data / name).read_text().splitlines()[:n]
        (data / name).write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "configs/smollm2-135m.yaml",
        "--train_file",
        str(data / "train.jsonl"),
        "--eval_file",
        str(data / "eval.jsonl"),
        "--max_seq_len",
        "128",
        "--batch_size",
        "2",
        "--max_steps",
        "3",
        "--save_steps",
        "2",
        "--output.dir",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and 1 < summary["eval_perplexity"] < 1000
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()
    # --resume with more steps continues from checkpoint-2, not from zero.
    assert main(args[:-6] + ["--max_steps", "4", "--save_steps", "2", "--output.dir", str(out), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4

    # ... then export: merge, F16 GGUF, Q8_0, each run by llama.cpp, the report, and CPU generation from it.
    gguf_dir = tmp_path / "gguf"
    assert (
        main(
            [
                "export",
                "gguf",
                "--adapter",
                str(out / "final_adapter"),
                "--quant",
                "Q8_0",
                "--out",
                str(gguf_dir),
                "--ctx",
                "128",
            ]
        )
        == 0
    )
    report = json.loads((gguf_dir / "export_report.json").read_text())
    q8 = next(f for f in report["files"] if f["type"] == "Q8_0")
    assert q8["sample"] and abs(q8["ppl_vs_hf_pct"]) < 2 and report["merge"]["max_logit_diff_fp32"] < 1e-2
    assert (gguf_dir / "Modelfile").read_text().count("<|im_start|>") >= 3
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--gguf",
                str(gguf_dir / "model-Q8_0.gguf"),
                "--prompt",
                "What is a list?",
                "--max-tokens",
                "8",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() and "tokens/s" in captured.err
