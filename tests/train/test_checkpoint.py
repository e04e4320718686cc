"""Checkpoints that survive what happens to real runs: crafted pickles, truncated files, full
disks, a crash before the data reaches the disk, an evaluation that runs out of memory, reruns
into a used folder, and resumes of finished or reconfigured runs."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from qlora_platform.cli import main
from qlora_platform.config import dump_config
from qlora_platform.errors import UserError
from qlora_platform.train import checkpoint as ckpt_mod
from qlora_platform.train.checkpoint import list_checkpoints, save_checkpoint
from qlora_platform.train.trainer import Trainer
from tests.conftest import tiny_run_config, toy_task


def _quiet(*_args):
    pass


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """One 6-step run (checkpoint-3, checkpoint-6, final_adapter, summary) that tests copy."""
    root = tmp_path_factory.mktemp("ckpt")
    train, held = toy_task(root)
    cfg = tiny_run_config(tiny_model_dir, train, held, root / "run")
    Trainer(cfg, log=_quiet).train()
    return cfg


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run, and its config pointing at it."""
    cfg = finished_run.model_copy(deep=True)
    shutil.copytree(finished_run.output.dir, tmp_path / "run")
    cfg.output.dir = str(tmp_path / "run")
    return cfg


def _unfinish(cfg) -> Path:
    """The copy as a run stopped after checkpoint-3 (and the log of its first run kept)."""
    out = Path(cfg.output.dir)
    shutil.rmtree(out / "checkpoint-6", ignore_errors=True)
    shutil.rmtree(out / "final_adapter")
    (out / "train_summary.json").unlink()
    return out


def _evil_pickle(path: Path, marker: Path) -> None:
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"python": RunsCode(), "torch": torch.get_rng_state()}, path)


def test_a_run_ends_with_a_checkpoint_at_the_final_step(finished_run):
    out = Path(finished_run.output.dir)
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.tmp")) and not (out / "final_adapter.old").exists()


def test_a_crafted_rng_state_pickle_never_runs(run, tmp_path):
    out = _unfinish(run)
    marker = tmp_path / "code-ran"
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-4")  # a newer checkpoint, crafted
    _evil_pickle(out / "checkpoint-4" / "rng_state.pt", marker)
    logs = []
    resumed = Trainer(run, resume=True, log=logs.append)
    assert not marker.exists() and resumed.step == 3
    text = "\n".join(map(str, logs))
    assert "checkpoint-4 cannot be loaded: rng_state.pt holds objects other than tensors" in text
    assert "falling back to checkpoint-3" in text
    # Loading the file directly refuses it too, in one line.
    with pytest.raises(UserError, match="rng_state.pt' holds objects other than tensors") as err:
        ckpt_mod.load_training_state(out / "checkpoint-4", resumed.optimizer, resumed.scheduler, "cpu")
    assert "\n" not in str(err.value) and not marker.exists()
    # With no sound checkpoint left, --resume stops with one line instead of loading it.
    shutil.rmtree(out / "checkpoint-3")
    with pytest.raises(UserError, match="no checkpoint in .* can be loaded .*rng_state.pt") as err:
        Trainer(run, resume=True, log=_quiet)
    assert "\n" not in str(err.value) and not marker.exists()


def test_resume_falls_back_past_truncated_and_empty_files(run):
    out = _unfinish(run)
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-4")
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    logs = []
    assert Trainer(run, resume=True, log=logs.append).step == 3
    assert any(
        "checkpoint-4 cannot be loaded: adapter_model.safetensors is missing or truncated" in str(m) for m in logs
    )
    (out / "checkpoint-4" / "trainer_state.json").write_text("")
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(
        UserError,
        match="checkpoint-4: trainer_state.json is unreadable.*checkpoint-3: optimizer.pt is empty or truncated",
    ):
        Trainer(run, resume=True, log=_quiet)


def test_checkpoint_files_reach_the_disk_before_the_rename_and_the_pruning(tmp_path, monkeypatch):
    class Model:
        def save_pretrained(self, path, safe_serialization=True):
            (Path(path) / "adapter_model.safetensors").write_bytes(b"weights")

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    events = []
    real_replace, real_rmtree = os.replace, shutil.rmtree
    monkeypatch.setattr(ckpt_mod, "_fsync", lambda path: events.append(("fsync", Path(path).name)))
    monkeypatch.setattr(
        ckpt_mod.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b))
    )
    monkeypatch.setattr(
        ckpt_mod.shutil, "rmtree", lambda p, **kw: (events.append(("remove", Path(p).name)), real_rmtree(p, **kw))
    )
    for step in (1, 2):
        save_checkpoint(tmp_path, step, Model(), optimizer, scheduler, {}, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    second = events[events.index(("rename", "checkpoint-1")) + 1 :]
    rename = second.index(("rename", "checkpoint-2"))
    synced = {name for kind, name in second[:rename] if kind == "fsync"}
    assert {
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pt",
        "trainer_state.json",
        "checkpoint-2.tmp",
    } <= synced
    assert ("fsync", tmp_path.name) in second[rename:]  # the rename itself
    pruned = second.index(("remove", "checkpoint-1"))
    assert second.index(("fsync", tmp_path.name), rename) < pruned


def test_a_full_disk_mid_save_leaves_no_tmp_folder_and_one_clear_line(run, tmp_path):
    run.output.dir = str(tmp_path / "fresh")
    trainer = Trainer(run, log=_quiet)
    real = trainer.model.save_pretrained

    def disk_full(path, **kwargs):
        (Path(path) / "adapter_model.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    trainer.model.save_pretrained = disk_full
    with pytest.raises(UserError) as err:
        trainer.train()  # the save at step 3 fails
    text = str(err.value)
    assert "could not write checkpoint-3" in text and "No space left on device" in text
    assert "no checkpoint is saved yet" in text and "--resume" in text and "\n" not in text
    out = Path(run.output.dir)
    assert not list(out.glob("*.tmp")) and not list_checkpoints(out)
    # A .tmp folder left by a killed save is removed by the next one.
    (out / "checkpoint-2.tmp").mkdir()
    (out / "checkpoint-2.tmp" / "optimizer.pt").write_bytes(b"partial")
    trainer.model.save_pretrained = real
    trainer.save_checkpoint()
    assert not list(out.glob("*.tmp")) and [s for s, _ in list_checkpoints(out)] == [3]


def test_out_of_memory_in_the_final_evaluation_keeps_the_adapter_and_the_last_step(run, tmp_path):
    run.output.dir = str(tmp_path / "fresh")
    trainer = Trainer(run, log=_quiet)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.evaluate = oom
    with pytest.raises(UserError) as err:
        trainer.train()
    text = str(err.value)
    out = Path(run.output.dir)
    assert "out of memory in the final holdout evaluation" in text and "training is complete" in text
    assert f"saved the 6 finished steps in {out / 'checkpoint-6'}" in text and "\n" not in text
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "train_summary.json").exists()
    # --resume then runs only the final evaluation.
    resumed = Trainer(run, resume=True, log=_quiet)
    assert resumed.step == 6 and not resumed.finished
    summary = resumed.train()
    assert summary["steps"] == 6 and summary["eval_perplexity"] > 1
    losses = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_used_output_dir_needs_resume_or_overwrite(run):
    out = Path(run.output.dir)
    with pytest.raises(UserError, match="already holds a training run.*--resume.*--overwrite") as err:
        Trainer(run, log=_quiet)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="give one of them"):
        Trainer(run, resume=True, overwrite=True, log=_quiet)
    (out / "notes.txt").write_text("mine")
    Trainer(run, overwrite=True, log=_quiet)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_cuts_the_log_back_to_the_resumed_step(run):
    out = _unfinish(run)
    before = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in before][-1] == 6  # the first run logged 1-6
    resumed = Trainer(run, resume=True, log=_quiet)
    resumed.train()
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [6]


def test_resume_of_a_finished_run_trains_nothing(run, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(run))
    before = (Path(run.output.dir) / "train_log.jsonl").read_text()
    assert main(["train", "--config", str(path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "is finished (6 steps of 6" in out and "nothing to train" in out and "done:" not in out
    assert (Path(run.output.dir) / "train_log.jsonl").read_text() == before


def test_resume_says_what_changed_and_uses_the_new_learning_rate(run):
    _unfinish(run)
    run.training.learning_rate = 1e-3
    run.training.max_steps = 8
    logs = []
    resumed = Trainer(run, resume=True, log=logs.append)
    text = "\n".join(map(str, logs))
    assert "training.learning_rate: 0.005 -> 0.001" in text and "training.max_steps: 6 -> 8" in text
    assert resumed.step == 3 and resumed.total_steps == 8
    assert resumed.scheduler.base_lrs == [1e-3]
    group = resumed.optimizer.param_groups[0]
    assert group["initial_lr"] == 1e-3 and 0 < group["lr"] <= 1e-3
    assert resumed.scheduler.get_last_lr() == [group["lr"]]


def test_resume_refusal_names_each_changed_key_with_both_values(run):
    _unfinish(run)
    run.training.seed = 7
    run.data.max_seq_len = 128
    with pytest.raises(UserError) as err:
        Trainer(run, resume=True, log=_quiet)
    text = str(err.value)
    assert "training.seed was 42 in" in text and "but is 7 now" in text
    assert "data.max_seq_len was 96 in" in text and "but is 128 now" in text and "\n" not in text


def test_first_loss_fractional_epochs_singular_step_and_no_holdout(run, tmp_path, capsys, monkeypatch):
    run.output.dir = str(tmp_path / "short")
    run.data.eval_file = None
    run.training.max_steps = 2
    run.training.logging_steps = 100
    path = tmp_path / "short.yaml"
    path.write_text(dump_config(run))
    real, calls = Trainer._forward_backward, {"n": 0}

    def oom_in_step_2(self, rows, n):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, rows, n)

    monkeypatch.setattr(Trainer, "_forward_backward", oom_in_step_2)
    assert main(["train", "--config", str(path)]) == 2
    assert "saved the 1 finished step in" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_forward_backward", real)
    assert main(["train", "--config", str(path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps in" in out and "no holdout" in out and "None" not in out
    records = [json.loads(line) for line in (tmp_path / "short" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(1, round(1 / 6, 3)), (2, round(2 / 6, 3))]
    summary = json.loads((tmp_path / "short" / "train_summary.json").read_text())
    assert summary["train_loss_first"] == records[0]["loss"] != summary["train_loss_last"] == records[1]["loss"]
