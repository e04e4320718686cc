"""`qlora train` stopped by a signal, as real runs are: `kill -TERM` (SLURM, docker stop, systemd)
and `kill -INT` on a background job (whose SIGINT a non-interactive shell set to ignored), with
its output going to pipes whose reader has gone (`| tee` stopped by the same Ctrl-C). Each saves
a checkpoint at the step reached, exits 128 + signal, and `--resume` continues the same log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from qlora_platform.config import dump_config
from qlora_platform.train.checkpoint import list_checkpoints


def _config(tiny_cfg, tmp_path) -> Path:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.training.max_steps = 1000  # far more than the test waits for
    cfg.training.save_steps = 1000
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    return path


def _train(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "qlora_platform.cli", "train", *args], env=env, **kwargs)


def _logged_steps(out: Path) -> list[int]:
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def _wait_for_steps(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.time() + 300
    while len(_logged_steps(out)) < n:
        assert proc.poll() is None, f"training ended early with {proc.returncode}"
        assert time.time() < deadline, "no training steps within 300 s"
        time.sleep(0.2)


def _assert_checkpoint_at_the_step_reached(out: Path) -> int:
    steps = _logged_steps(out)
    reached = steps[-1]
    assert steps == list(range(1, reached + 1))
    assert [s for s, _ in list_checkpoints(out)] == [reached]
    state = json.loads((out / f"checkpoint-{reached}" / "trainer_state.json").read_text())
    assert state["global_step"] == reached
    assert not list(out.glob("*.tmp"))
    return reached


def test_sigterm_with_stdout_gone_saves_says_how_to_continue_and_resumes(tiny_cfg, tmp_path):
    path, out = _config(tiny_cfg, tmp_path), Path(tiny_cfg.output.dir)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = _train("--config", str(path), stdout=subprocess.PIPE, stderr=err)
        _wait_for_steps(proc, out, 2)
        proc.stdout.close()  # whoever read stdout is gone
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 128 + signal.SIGTERM
    reached = _assert_checkpoint_at_the_step_reached(out)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
    message = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert message == [
        f"error: interrupted at step {reached}/1000 by SIGTERM; saved {out / f'checkpoint-{reached}'}. "
        f"Continue with: qlora train --config {out / 'config.yaml'} --resume"
    ]

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_platform.cli",
            "train",
            "--config",
            str(out / "config.yaml"),
            "--resume",
            "--training.max_steps",
            str(reached + 2),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"training.max_steps: 1000 -> {reached + 2}" in done.stdout
    assert re.search(rf"done: {reached + 2} steps in .*, eval perplexity \d+\.\d{{3}}$", done.stdout, re.M), done.stdout
    assert _logged_steps(out) == list(range(1, reached + 3))  # no step twice


def test_sigint_to_a_background_run_with_both_pipes_gone_still_saves(tiny_cfg, tmp_path):
    path, out = _config(tiny_cfg, tmp_path), Path(tiny_cfg.output.dir)

    def like_a_background_job():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = _train(
        "--config", str(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=like_a_background_job
    )
    _wait_for_steps(proc, out, 2)
    proc.stdout.close()  # `| tee` ended by the same Ctrl-C
    proc.stderr.close()
    time.sleep(1.0)  # a progress write or two into the dead pipes
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 128 + signal.SIGINT
    _assert_checkpoint_at_the_step_reached(out)
