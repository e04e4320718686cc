"""Two processes on the CPU (gloo) learn what one process learns from the same global batch,
with DDP and with FSDP, and a two-process run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qlora_platform.config import dump_config


def _qlora_train(config, *args, timeout=600) -> subprocess.CompletedProcess:
    """`qlora train --config CONFIG ARGS` in a fresh interpreter, its output captured."""
    cmd = [sys.executable, "-m", "qlora_platform.cli", "train", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _write_config(cfg, out):
    cfg = cfg.model_copy(deep=True)
    cfg.output.dir = str(out)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(dump_config(cfg))
    return path


def _train(cfg, out, *extra, processes=1):
    run = _qlora_train(_write_config(cfg, out), "--num-processes", str(processes), *extra)
    assert run.returncode == 0, "\n".join(
        line for line in run.stderr.splitlines() if "Error" in line or "rank0" in line
    )[-6000:]
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]


def _adapter(out):
    return load_file(str(out / "final_adapter" / "adapter_model.safetensors"))


@pytest.fixture
def cfg(tiny_cfg):
    # Global batch 4: one process x 4 rows, or two processes x 2 rows.
    tiny_cfg.training.report_to = []
    tiny_cfg.data.eval_file = None
    return tiny_cfg


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(cfg, tmp_path, strategy):
    one = _train(cfg, tmp_path / "one")
    cfg.training.batch_size = 2
    cfg.training.strategy = strategy
    two = _train(cfg, tmp_path / "two", processes=2)
    assert len(one) == len(two) == cfg.training.max_steps
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4), (one, two)
    assert two[-1] < two[0]
    want, got = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_resumes_from_its_checkpoint(cfg, tmp_path, strategy):
    cfg.training.batch_size = 2
    cfg.training.strategy = strategy
    cfg.training.save_steps = 3
    run = tmp_path / "run"
    _train(cfg, run, processes=2)  # 6 steps, checkpoint-3 on the way
    ckpt = run / "checkpoint-3"
    assert (ckpt / "optimizer-rank0.pt").is_file() and (ckpt / "optimizer-rank1.pt").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 3 and state["strategy"] == strategy
    straight = _adapter(run)
    shutil.rmtree(run / "checkpoint-6")  # the final step's: resume from checkpoint-3
    (run / "train_log.jsonl").unlink()
    resumed = _train(cfg, run, "--resume", processes=2)  # steps 4-6 again, from checkpoint-3
    assert len(resumed) == 3
    for name, tensor in straight.items():
        torch.testing.assert_close(_adapter(run)[name], tensor, atol=1e-6, rtol=1e-5)


def test_resume_with_another_process_count_is_refused(cfg, tmp_path):
    cfg.training.batch_size = 2
    cfg.training.save_steps = 3
    _train(cfg, tmp_path / "run", processes=2)
    run = _qlora_train(_write_config(cfg, tmp_path / "run"), "--resume", timeout=300)
    assert run.returncode != 0 and "resume with --num-processes 2" in run.stderr


def test_accelerate_config_is_written_for_each_strategy(cfg, tmp_path):
    import yaml

    for strategy, kind in [("ddp", "MULTI_CPU"), ("fsdp", "FSDP"), ("deepspeed-zero3", "DEEPSPEED")]:
        cfg.training.strategy = strategy
        out = tmp_path / f"acc-{strategy}.yaml"
        path = _write_config(cfg, tmp_path / strategy)
        run = _qlora_train(path, "--num-processes", "2", "--write-accelerate-config", str(out), timeout=120)
        assert run.returncode == 0, run.stderr
        written = yaml.safe_load(out.read_text())
        assert written["distributed_type"] == kind and written["num_processes"] == 2
        assert "accelerate launch --config_file" in run.stdout
