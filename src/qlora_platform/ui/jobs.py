"""Long work of the web UI as subprocesses of the `qlora` CLI, one job at a time per workspace.

A job is one or more CLI commands run in order (prepare then validate, say) in the
workspace folder; the next starts only when the one before exits 0. Output goes to
`.qlora-ui/jobs/<id>.log` and the job's state to `<id>.json` beside it, so the page
shows the same job and log after a reload, and the last job after a restart of the UI.
Stop sends SIGTERM to the command's process group: `qlora train` saves a checkpoint
first, which Resume continues. Jobs run with the UI's login removed from their
environment and without the workspace on their import path.

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
    pid: int | None = None  # process group of the running step
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


def _alive(pgid: int | None) -> bool:
    """Whether the process group a job record names still runs a `qlora` command (a reused id does not count)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    return b"qlora_platform" in cmdline


class JobRunner:
    """Starts, watches and stops the workspace's jobs; safe to call from Gradio's worker threads.

    A job whose UI went away (a crash, SIGKILL) while it ran is found running again by the next
    UI on the workspace: it is adopted (followed until its process group ends, and stoppable), so
    one job at a time holds across restarts too.
    """

    def __init__(
        self,
        workspace: Workspace,
        before_start: Callable[[], None] | None = None,
        program: list[str] | None = None,
    ):
        self.ws = workspace
        # `-I`: the workspace (the jobs' current folder) is not put on sys.path, so a json.py there
        # cannot stand in for the standard library; `-u` streams output to the log as it is written.
        self.program = program or [sys.executable, "-I", "-u", "-m", "qlora_platform.cli"]
        self.folder = workspace.state / "jobs"
        self.folder.mkdir(exist_ok=True)
        self.before_start = before_start  # frees what the UI holds (the chat model) before a job needs memory
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        records = list(self._records())  # newest first; read once: this UI alone starts the workspace's jobs
        self._newest = {job.kind: job for _, job in reversed(records)}  # each tab's newest job
        self._job: Job | None = self._resume_watch(*records[0]) if records else None

    def _records(self):
        for path in sorted(self.folder.glob("*.json"), reverse=True):
            try:
                yield path, Job(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue

    def _resume_watch(self, path: Path, job: Job) -> Job:
        """The newest job on record: one still running is adopted, one that died with its UI is marked stopped."""
        if job.active and _alive(job.pid):
            threading.Thread(target=self._watch, args=(job,), daemon=True, name=f"qlora-ui-{job.id}").start()
        elif job.active:
            job.status, job.ended = "stopped", job.ended or path.stat().st_mtime
            self._save(job)
        return job

    def current(self) -> Job | None:
        """The running job, else the last one."""
        return self._job

    def latest(self, kind: str) -> Job | None:
        """The newest job a tab started (the current one when it is of that kind)."""
        return self._newest.get(kind)

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
            try:
                self._spawn(job)
                self._save(job)
            except OSError as err:
                if self._proc is not None and self._proc.poll() is None:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc = None
                raise UserError(f"cannot start the {kind} job: {err.strerror or err}") from None
            self._job = self._newest[kind] = job
        threading.Thread(target=self._watch, args=(job,), daemon=True, name=f"qlora-ui-{job_id}").start()
        return job

    def _spawn(self, job: Job) -> None:
        # The UI's login stays out of the jobs' environment (model code and reward functions run there).
        env = {k: v for k, v in os.environ.items() if k != "QLORA_UI_AUTH"}
        with open(job.log, "ab") as log:
            log.write(f"$ {job.commands[job.step]}\n".encode())
            self._proc = subprocess.Popen(
                [*self.program, *job.steps[job.step]],
                cwd=self.ws.root,
                stdin=subprocess.DEVNULL,
                stdout=log,  # the child has its own copy of the handle; ours closes here
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: Stop reaches every process it starts
            )
        job.pid = self._proc.pid

    def _wait(self, job: Job) -> int | None:
        """The current step's exit code (None for an adopted process, whose code is not ours to read)."""
        proc = self._proc
        if proc is not None and proc.pid == job.pid:
            return proc.wait()
        while _alive(job.pid):
            time.sleep(1.0)
        return None

    def _watch(self, job: Job) -> None:
        while True:
            code = self._wait(job)
            with self._lock:
                stopping = job.status == "stopping"
                ok = code == 0 or (code is None and last_error(read_log(job.log)) is None)
                try:
                    if ok and not stopping and job.step + 1 < len(job.steps):
                        job.step += 1
                        self._spawn(job)
                        self._save(job)
                        continue
                except OSError as err:
                    ok = False
                    with open(job.log, "a", encoding="utf-8") as log:
                        log.write(f"error: cannot start the next step: {err.strerror or err}\n")
                job.returncode = code
                job.status = "stopped" if stopping else ("done" if ok else "failed")
                job.ended = time.time()
                self._proc = None
                with contextlib.suppress(OSError):  # a full disk must not leave the job "running" for ever
                    self._save(job)
                return

    def stop(self, timeout: float | None = None) -> Job | None:
        """SIGTERM to the running command's process group (training saves a checkpoint and exits)."""
        with self._lock:
            job = self._job
            if job is None or not job.active or not job.pid:
                return job
            job.status = "stopping"
            with contextlib.suppress(OSError):
                self._save(job)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGTERM)
        if timeout is not None:
            deadline = time.time() + timeout
            while job.active and time.time() < deadline:
                time.sleep(0.2)
            if job.active:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.pid, signal.SIGKILL)
        return job

    def _save(self, job: Job) -> None:
        path = self.folder / f"{job.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")
        os.replace(tmp, path)
