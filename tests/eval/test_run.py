"""`qlora eval` and `qlora compare` end to end on a tiny trained adapter: report schema and files."""

from __future__ import annotations

import json

import pytest

from qlora_platform.cli import main
from qlora_platform.errors import UserError
from qlora_platform.eval.compare import compare_runs
from qlora_platform.eval.run import run_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tokenizer):
    """A tiny QLoRA run (6 steps) with its adapter, logs and summary."""
    from qlora_platform.config import load_config
    from qlora_platform.train.trainer import Trainer
    from tests.conftest import chat, write_jsonl

    root = tmp_path_factory.mktemp("evalrun")
    words = ["alpha", "beta", "gamma", "delta"]
    train = write_jsonl(
        root / "train.jsonl", [chat(f"Spell {w} {i}.", f"{w} {w} {w} done.") for i in range(12) for w in words]
    )
    held = write_jsonl(root / "eval.jsonl", [chat(f"Spell {w}.", f"{w} {w} {w} done.") for w in words])
    cfg = load_config(
        None,
        {
            "model.name": str(tiny_model_dir),
            "data.train_file": str(train),
            "data.eval_file": str(held),
            "data.max_seq_len": 64,
            "training.max_steps": 6,
            "training.learning_rate": 5e-3,
            "training.logging_steps": 1,
            "training.save_steps": 100,
            "training.device": "cpu",
            "training.gradient_checkpointing": False,
            "training.report_to": "[]",
            "lora.r": 8,
            "quantization.compute_dtype": "float32",
            "output.dir": str(root / "run"),
        },
    )
    Trainer(cfg, log=lambda *a: None).train()
    prompts = root / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "name": "spell",
                "system": "Spell.",
                "generation": {"max_new_tokens": 6},
                "prompts": [
                    {"id": f"p{i}", "prompt": f"Spell {w}.", "keywords": [w, "done"]}
                    for i, w in enumerate(words + ["alpha"])
                ],
            }
        )
    )
    return root, prompts


def test_eval_writes_the_report_with_its_schema(trained_run):
    root, prompts = trained_run
    report = run_eval(
        str(root / "run" / "final_adapter"),
        prompts=str(prompts),
        speed_runs=2,
        speed_tokens=4,
        batch_size=3,
        log=lambda *a: None,
    )
    out = root / "run" / "eval"
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["perplexity"]["base"] > 1 and saved["perplexity"]["tuned"] > 1
    # Training on this toy task lowers the holdout perplexity a lot; base = adapter off.
    assert saved["perplexity"]["tuned"] < saved["perplexity"]["base"]
    assert 0 <= saved["keyword_pass_rate"]["base"] <= 1 and 0 <= saved["keyword_pass_rate"]["tuned"] <= 1
    assert saved["tokens_per_s"] == saved["speed"]["decode_tokens_per_s"] > 0
    assert saved["speed"]["prefill_tokens_per_s"] > 0 and saved["speed"]["ttft_ms"] > 0
    assert len(saved["prompts"]) == 5 and saved["keyword_benchmark"]["in_training_data"] == 0
    row = saved["prompts"][0]
    assert set(row["tuned"]) >= {"answer", "hits", "missed", "passed", "tokens"}
    assert saved["train"]["steps"] == 6
    assert saved["plots"] == ["loss.png", "perplexity.png", "keywords.png"]
    for name in saved["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and (out / name).stat().st_size > 5000
    md = (out / "eval.md").read_text()
    assert "| holdout perplexity |" in md and "assistant-answer tokens only" in md
    assert md.count("**base**") == 5 and "![loss.png](loss.png)" in md


def test_compare_tabulates_runs_and_tolerates_missing_pieces(trained_run, tmp_path):
    root, _ = trained_run
    untrained = tmp_path / "half"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((root / "run" / "config.yaml").read_text())
    markdown, rows = compare_runs([str(root / "run"), str(untrained)], out=str(tmp_path / "cmp"))
    assert rows[0]["lora_r"] == 8 and rows[0]["steps"] == 6 and rows[1]["steps"] is None
    runs_table = markdown.split("\n## ")[0]
    assert runs_table.count("\n| ") == 2 and "| - |" in runs_table
    assert json.loads((tmp_path / "cmp.json").read_text())[0]["run"] == str(root / "run")
    with pytest.raises(UserError, match="is it a 'qlora train' output folder"):
        compare_runs([str(tmp_path)])


def _eval_with(folder, verdicts: dict) -> None:
    """A run folder whose eval.json holds only keyword benchmark rows: id -> (base hits, tuned hits)."""
    (folder / "eval").mkdir(parents=True)
    rows = [
        {
            "id": pid,
            "prompt": f"{pid}?",
            "keywords": ["a", "b", "c"],
            "needed": 2,
            "base": {"hit_count": b, "passed": b >= 2},
            "tuned": {"hit_count": t, "passed": t >= 2},
        }
        for pid, (b, t) in verdicts.items()
    ]
    (folder / "eval" / "eval.json").write_text(json.dumps({"prompts": rows}))


def test_compare_lists_the_benchmark_prompt_by_prompt(tmp_path):
    _eval_with(tmp_path / "r-8", {"json": (1, 2), "glob": (2, 1)})
    _eval_with(tmp_path / "r-16", {"json": (1, 3), "glob": (2, 2)})
    markdown, _ = compare_runs([str(tmp_path / "r-8"), str(tmp_path / "r-16")], out=str(tmp_path / "cmp"))
    section = markdown.split("## The keyword benchmark, prompt by prompt\n\n")[1]
    assert "| prompt | needed | base | r-8 | r-16 | tuned passed |" in section
    assert "| `json` | 2 of 3 | 1 fail | 2 pass | 3 pass | 2 of 2 |" in section
    assert "| `glob` | 2 of 3 | 2 pass | 1 fail | 2 pass | 1 of 2 |" in section
    assert "Base passes: 1/2; tuned passes: r-8 1/2, r-16 2/2." in section
    saved = json.loads((tmp_path / "cmp_prompts.json").read_text())
    assert saved[0]["runs"]["r-16"] == {"base": {"hits": 1, "passed": False}, "tuned": {"hits": 3, "passed": True}}
    # Bases that differ (another base model, another machine) get a column each.
    _eval_with(tmp_path / "other", {"json": (2, 2)})
    markdown, _ = compare_runs([str(tmp_path / "r-8"), str(tmp_path / "other")])
    assert "| prompt | needed | base r-8 | base other | r-8 | other | tuned passed |" in markdown
    assert "| `glob` | 2 of 3 | 2 pass | - | 1 fail | - | 0 of 1 |" in markdown
    assert "Base passes: r-8 1/2, other 1/1; tuned passes: r-8 1/2, other 1/1." in markdown
    # Runs of one folder name in different places keep a column each.
    _eval_with(tmp_path / "b" / "r-8", {"json": (1, 1)})
    markdown, _ = compare_runs([str(tmp_path / "r-8"), str(tmp_path / "b" / "r-8")], out=str(tmp_path / "two.md"))
    assert f"| {tmp_path / 'r-8'} | {tmp_path / 'b' / 'r-8'} |" in markdown
    assert (tmp_path / "two_prompts.json").is_file() and (tmp_path / "two.json").is_file()


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path / "missing")]) == 2
    assert "adapter folder" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    # The prompt file is checked before any model is loaded.
    assert main(["eval", "--adapter", str(tmp_path), "--prompts", str(bad)]) == 2
    assert "at least 1 item" in capsys.readouterr().err


def test_train_and_eval_report_the_same_holdout_perplexity(tmp_path, tiny_model_dir):
    """The run's last holdout perplexity and `qlora eval`'s agree for the same adapter, with the
    default precision (bf16 compute, fp32 norms on the CPU) and LoRA dropout on."""
    from qlora_platform.train.trainer import Trainer
    from tests.conftest import tiny_run_config, toy_task

    train, held = toy_task(tmp_path)
    cfg = tiny_run_config(
        tiny_model_dir,
        train,
        held,
        tmp_path / "run",
        **{
            "training.max_steps": 3,
            "training.warmup_ratio": 0.05,
            "training.save_steps": 100,
            "training.gradient_checkpointing": True,
            "lora.dropout": 0.05,
            "quantization.compute_dtype": "bfloat16",
        },
    )
    summary = Trainer(cfg, log=lambda *a: None).train()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "name": "spell",
                "generation": {"max_new_tokens": 2},
                "prompts": [{"id": "p", "prompt": "Spell alpha.", "keywords": ["alpha"]}],
            }
        )
    )
    report = run_eval(
        str(tmp_path / "run" / "final_adapter"),
        prompts=str(prompts),
        speed_runs=1,
        speed_tokens=2,
        samples=1,
        log=lambda *a: None,
    )
    assert report["perplexity"]["tuned"] == pytest.approx(summary["eval_perplexity"], rel=1e-3)


def test_eval_with_retrieval_reports_hits_and_the_two_by_two_table(trained_run, tmp_path, capsys):
    from qlora_platform.rag.index import index_documents
    from qlora_platform.rag.prompt import Grounding
    from qlora_platform.rag.retrieve import Retriever
    from qlora_platform.rag.settings import RagSettings
    from tests.conftest import chat, write_jsonl

    root, prompts = trained_run
    words = ["alpha", "beta", "gamma", "delta"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "spelling.md").write_text(
        "# Spelling\n\n" + "".join(f"## {w}\n\nThe word {w} is spelled {' '.join(w)}, then done.\n\n" for w in words)
    )
    held = write_jsonl(
        tmp_path / "eval.jsonl",
        [{**chat(f"Spell {w}.", f"{w} {w} {w} done."), "source": f"spelling.md#{w}"} for w in words],
    )
    db = str(tmp_path / "db")
    index_documents([str(docs)], db, RagSettings(), progress=False, log=lambda *a: None)
    settings = RagSettings(k=2, prompt_tokens=64)
    report = run_eval(
        str(root / "run" / "final_adapter"),
        prompts=str(prompts),
        eval_file=str(held),
        out=str(tmp_path / "out"),
        speed_runs=1,
        speed_tokens=2,
        grounding=Grounding(Retriever.open(db, settings), settings),
        log=lambda *a: None,
    )
    r = report["retrieval"]
    assert r["k"] == 2 and r["mode"] == "hybrid" and r["hits"]["questions"] == 4
    assert r["hits"]["keyword"] == {"hit_at_1": 1.0, "hit_at_2": 1.0, "mrr": 1.0}
    assert set(r["hits"]) >= {"hybrid", "vector", "keyword", "misses"}
    rate = r["keyword_pass_rate"]
    assert rate["base"]["without"] == report["keyword_pass_rate"]["base"]
    assert rate["tuned"]["without"] == report["keyword_pass_rate"]["tuned"]
    assert 0 <= rate["tuned"]["with"] <= 1 and r["prompts"] == 5 and 0 < r["passages_per_prompt"] <= 2
    assert r["answers"][0]["sources"][0].endswith("spelling.md § alpha")
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "## Retrieval" in md and "| hybrid (used) |" in md and "| | without retrieval | with retrieval |" in md
    assert "### Answers with retrieval" in md and md.count("tuned with retrieval (") == 3

    # An index that is not there stops before the model loads, in one line.
    capsys.readouterr()
    assert main(["eval", "--adapter", str(root / "run" / "final_adapter"), "--rag", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no index at") and "\n" not in err
