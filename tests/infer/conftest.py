"""A real `qlora serve` process on loopback with the bundled model, for the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import requests

KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "qlora_platform.cli",
            "serve",
            "--model",
            "bundled:smollm2-135m-instruct",
            "--device",
            "cpu",
            "--port",
            str(self.port),
            "--name",
            "smollm2",
            "--log-level",
            "warning",
            *extra,
        ]
        self.log = subprocess.DEVNULL if not os.environ.get("QLORA_TEST_SERVER_LOG") else None
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> dict:
        """/health answers at once (503 while loading); return its body once it is 200."""
        deadline = time.time() + timeout
        seen_loading = False
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                r = requests.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return {"seen_loading": seen_loading, **r.json()}
                seen_loading |= r.status_code == 503 and r.json()["status"] == "loading"
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(
        "--api-key", KEY, "--max-concurrent", "2", "--max-queue", "4", "--max-body-kb", "64", "--queue-timeout", "30"
    )
    try:
        srv.ready = srv.wait_ready()
        yield srv
    finally:
        srv.stop()
