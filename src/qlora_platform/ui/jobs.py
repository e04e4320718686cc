"""Long work of the web UI as subprocesses of the `qlora` CLI, one job at a time per workspace.

A job is one or more CLI commands run in order (prepare then validate, say) in the
workspace folder; the next starts only when the one before exits 0. Output goes to
`.qlora-ui/jobs/<id>.log` and the job's state to `<id>.json` beside it, so the page
shows the same job and log after a reload, and the last job after a restart of the UI.
Stop sends SIGTERM to the command's process group: `qlora train` saves a checkpoint
first, which Resume continues.

    runner = JobRunner(workspace)
    job = runner.start("train", [["train", "--config", "configs/demo.yaml"]])
    runner.current().status           # "running", then "done", "failed" or "stopped"
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from .workspace import Workspace

# tqdm writes `desc: 40%|####      | 4/10 [...]` and rewrites it after a carriage return.
_BAR = re.compile(r"([A-Za-z][\w -]*?):\s+(\d+)%\|[^|\r\n]*\|\s*(\d+)/(\d+)")
ACTIVE = ("running", "stopping")


@dataclass
class Job:
    id: str
    kind: str  # the tab that started it: data, train, eval, export
    steps: list[list[str]]  # each the arguments after `qlora`
    log: str
    meta: dict = field(default_factory=dict)  # what the tab needs afterwards (run folder, report folder)
    status: str = "running"
    step: int = 0
    returncode: int | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None

    @property
    def commands(self) -> list[str]:
        return ["qlora " + shlex.join(argv) for argv in self.steps]

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def describe(self) -> str:
        elapsed = (self.ended or time.time()) - self.started
        code = f", exit {self.returncode}" if self.returncode not in (None, 0) else ""
        return f"{self.kind}: {self.status}{code} after {elapsed:.0f} s: `{' && '.join(self.commands)}`"


def read_log(path: str | Path, max_chars: int = 20000) -> str:
    """The end of a log with each progress bar shown once, at its latest state."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * max_chars))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(lines)[-max_chars:]


def progress(log_text: str) -> tuple[str, int, int] | None:
    """(description, done, total) of the last progress bar in the log, or None."""
    found = _BAR.findall(log_text)
    if not found:
        return None
    desc, _, done, total = found[-1]
    return desc.strip(), int(done), int(total)


def last_error(log_text: str) -> str | None:
    """The CLI's one-line `error: ...` message, if the log has one."""
    errors = [line for line in log_text.splitlines() if line.startswith("error: ")]
    return errors[-1] if errors else None


class JobRunner:
    """Starts, watches and stops the workspace's jobs; safe to call from Gradio's worker threads."""

    def __init__(
        self,
        workspace: Workspace,
        before_start: Callable[[], None] | None = None,
        program: list[str] | None = None,
    ):
        self.ws = workspace
        self.program = program or [sys.executable, "-m", "qlora_platform.cli"]  # what `qlora` means here
        self.folder = workspace.state / "jobs"
        self.folder.mkdir(exist_ok=True)
        self.before_start = before_start  # frees what the UI holds (the chat model) before a job needs memory
        self._lock = threading.Lock()
        self._job: Job | None = self._last_job()
        self._proc: subprocess.Popen | None = None

    def _records(self):
        for path in sorted(self.folder.glob("*.json"), reverse=True):
            try:
                yield path, Job(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue

    def _last_job(self) -> Job | None:
        """The newest job on record; one that was running when its UI went away is marked so."""
        for path, job in self._records():
            if job.active:
                job.status, job.ended = "stopped", job.ended or path.stat().st_mtime
            return job
        return None

    def current(self) -> Job | None:
        """The running job, else the last one."""
        return self._job

    def latest(self, kind: str) -> Job | None:
        """The newest job a tab started (the current one when it is of that kind)."""
        job = self._job
        if job is not None and job.kind == kind:
            return job
        return next((job for _, job in self._records() if job.kind == kind), None)

    def start(self, kind: str, steps: list[list[str]], meta: dict | None = None) -> Job:
        with self._lock:
            if self._job is not None and self._job.active:
                raise UserError(
                    f"a {self._job.kind} job is running ({self._job.commands[self._job.step]}); "
                    f"wait for it or stop it first"
                )
            if self.before_start:
                self.before_start()
            job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{kind}"
            job = Job(id=job_id, kind=kind, steps=steps, log=str(self.folder / f"{job_id}.log"), meta=meta or {})
            self._job = job
            self._save(job)
            self._proc = self._spawn(job)
        threading.Thread(target=self._watch, args=(job,), daemon=True, name=f"qlora-ui-{job_id}").start()
        return job

    def _spawn(self, job: Job) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(job.log, "a", encoding="utf-8") as log:
            log.write(f"$ {job.commands[job.step]}\n")
        return subprocess.Popen(
            [*self.program, *job.steps[job.step]],
            cwd=self.ws.root,
            stdin=subprocess.DEVNULL,
            stdout=open(job.log, "ab"),  # noqa: SIM115 - the child owns it; closed below after it exits
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: Stop reaches every process it starts
        )

    def _watch(self, job: Job) -> None:
        while True:
            proc = self._proc
            assert proc is not None
            code = proc.wait()
            if proc.stdout:
                proc.stdout.close()
            with self._lock:
                stopping = job.status == "stopping"
                if code == 0 and not stopping and job.step + 1 < len(job.steps):
                    job.step += 1
                    self._save(job)
                    self._proc = self._spawn(job)
                    continue
                job.returncode = code
                job.status = "stopped" if stopping else ("done" if code == 0 else "failed")
                job.ended = time.time()
                self._save(job)
                return

    def stop(self, timeout: float | None = None) -> Job | None:
        """SIGTERM to the running command's process group (training saves a checkpoint and exits)."""
        with self._lock:
            job, proc = self._job, self._proc
            if job is None or not job.active or proc is None:
                return job
            job.status = "stopping"
            self._save(job)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        if timeout is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        return job

    def _save(self, job: Job) -> None:
        path = self.folder / f"{job.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")
        os.replace(tmp, path)
