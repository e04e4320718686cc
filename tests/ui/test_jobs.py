"""Jobs: CLI commands as subprocesses, in order, one job at a time, stoppable, on record after a restart."""

from __future__ import annotations

import json
import sys
import time

import pytest

from qlora_platform.errors import UserError
from qlora_platform.ui.jobs import JobRunner, last_error, progress, read_log
from qlora_platform.ui.workspace import Workspace

# A stand-in for `qlora`: each step's first word says what to do, so the runner is tested without a model.
FAKE = r"""
# a qlora_platform stand-in (the runner adopts only processes whose command line says so)
import signal, sys, time
what = sys.argv[1]
if what == "ok":
    print("ok", *sys.argv[2:])
elif what == "fail":
    print("error: the input is bad; fix it"); sys.exit(2)
elif what == "bar":
    for i in range(1, 5):
        sys.stderr.write(f"\rtraining:  {25 * i}%|##        | {i}/4 [00:01<00:03]"); sys.stderr.flush()
    print()
elif what == "long":
    def stop(signum, frame):
        print("saved checkpoint-1; stopped", flush=True); sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    print("running", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def runner(tmp_path):
    ws = Workspace(tmp_path)
    return JobRunner(ws, program=[sys.executable, "-c", FAKE])


def wait(runner, limit=30):
    deadline = time.time() + limit
    while runner.current().active and time.time() < deadline:
        time.sleep(0.05)
    return runner.current()


def started(runner, limit=30):
    deadline = time.time() + limit
    while "running" not in read_log(runner.current().log):
        assert time.time() < deadline, "the job never started"
        time.sleep(0.05)


def test_steps_run_in_order_and_stop_at_the_first_failure(runner):
    runner.start("data", [["ok", "one"], ["ok", "two"]])
    job = wait(runner)
    assert job.status == "done" and job.returncode == 0 and job.step == 1
    assert read_log(job.log).splitlines() == ["$ qlora ok one", "ok one", "$ qlora ok two", "ok two"]
    runner.start("data", [["fail"], ["ok", "never"]])
    job = wait(runner)
    assert job.status == "failed" and job.returncode == 2 and job.step == 0
    assert last_error(read_log(job.log)) == "error: the input is bad; fix it"
    assert "never" not in read_log(job.log)


def test_one_job_at_a_time_and_stop_is_sigterm(runner):
    released = []
    runner.before_start = lambda: released.append(True)
    runner.start("train", [["long"]], {"run": "runs/x"})
    started(runner)
    with pytest.raises(UserError, match="a train job is running .*qlora long.*stop it first"):
        runner.start("eval", [["ok"]])
    runner.stop(timeout=10)
    job = wait(runner)
    assert job.status == "stopped" and job.returncode == 128 + 15
    assert "saved checkpoint-1; stopped" in read_log(job.log)
    assert released == [True]  # the chat model is let go before a job, not when one is refused


def test_the_last_job_is_on_record_after_a_restart(runner, tmp_path):
    runner.start("export", [["ok"]], {"out": "exports/x"})
    wait(runner)
    again = JobRunner(Workspace(tmp_path))
    assert again.current().id == runner.current().id and again.current().status == "done"
    assert again.latest("export").meta == {"out": "exports/x"} and again.latest("train") is None
    # a job its UI never saw end (killed with it) is not shown as running for ever
    record = again.folder / f"{again.current().id}.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"status": "running", "ended": None}))
    assert JobRunner(Workspace(tmp_path)).current().status == "stopped"


def test_progress_bars_are_read_at_their_latest_state(runner):
    runner.start("train", [["bar"]])
    job = wait(runner)
    text = read_log(job.log)
    assert progress(text) == ("training", 4, 4)
    assert text.count("training:") == 1  # the carriage-return rewrites collapse to the last one
    assert progress("no bar here") is None
    # `qlora eval`'s bars, as its log holds them: the last one is the one shown.
    log = "perplexity: 100%|###| 32/32 [00:56<00:00]\rtuned answers:  45%|####  | 57/128 [00:23<00:30]"
    assert progress(log) == ("tuned answers", 57, 128)


def test_a_job_left_running_by_a_dead_ui_is_adopted_not_forgotten(runner, tmp_path):
    runner.start("train", [["long"], ["ok", "after"]], {"run": "runs/x"})
    started(runner)
    next_ui = JobRunner(Workspace(tmp_path), program=runner.program)  # as after a crash of the first UI
    job = next_ui.current()
    assert job.status == "running" and job.pid == runner.current().pid
    with pytest.raises(UserError, match="a train job is running"):
        next_ui.start("eval", [["ok"]])
    next_ui.stop(timeout=10)
    assert job.status == "stopped" and "after" not in read_log(job.log)


def test_a_job_that_cannot_start_leaves_the_runner_usable(tmp_path):
    broken = JobRunner(Workspace(tmp_path), program=[str(tmp_path / "no-such-python")])
    with pytest.raises(UserError, match="^cannot start the data job: "):
        broken.start("data", [["ok"]])
    assert broken.current() is None
    broken.program = [sys.executable, "-c", FAKE]
    broken.start("data", [["ok"]])
    assert wait(broken).status == "done"
