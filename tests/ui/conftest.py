"""`qlora ui` started as a subprocess on a free loopback port, stopped (and its output checked) after the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UiProcess:
    def __init__(self, workspace: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlora_platform.cli", "ui", "--workspace", str(workspace), "--port", str(self.port)]
            + list(extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.output = ""

    def wait_up(self, limit: float = 120) -> UiProcess:
        deadline = time.time() + limit
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"qlora ui exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                requests.get(self.url, timeout=2)
                return self
            except requests.ConnectionError:
                time.sleep(0.5)
        raise AssertionError(f"qlora ui did not answer within {limit} s")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output += out or ""
        return self.output


@pytest.fixture
def start_ui():
    """start_ui(workspace, *options, env=None) -> a running UiProcess; all are stopped at the end, and
    none may have printed a traceback."""
    started: list[UiProcess] = []

    def start(workspace: Path, *extra: str, env: dict | None = None, wait: bool = True) -> UiProcess:
        ui = UiProcess(workspace, *extra, env=env)
        started.append(ui)
        return ui.wait_up() if wait else ui

    yield start
    for ui in started:
        out = ui.stop()
        assert "Traceback" not in out, out[-3000:]
