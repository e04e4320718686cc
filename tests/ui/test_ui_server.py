"""`qlora ui` as a server: the login holds, files outside the workspace are refused, bad starts are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from qlora_platform.errors import UserError
from qlora_platform.ui.app import App, Options
from qlora_platform.ui.forms import fields, preset_values, to_widget
from qlora_platform.ui.workspace import Workspace

pytestmark = pytest.mark.slow


def test_with_auth_nothing_answers_before_login(tmp_path, start_ui):
    (tmp_path / "notes.txt").write_text("a workspace file")
    (tmp_path / "exports" / "r").mkdir(parents=True)
    (tmp_path / "exports" / "r" / "model-Q8_0.gguf").write_bytes(b"GGUF export")
    ui = start_ui(tmp_path, "--auth", "ann:s3cret")
    export = f"{ui.url}/gradio_api/file={tmp_path / 'exports' / 'r' / 'model-Q8_0.gguf'}"
    for path in ("/config", "/gradio_api/info", f"/gradio_api/file={tmp_path / 'exports' / 'r' / 'model-Q8_0.gguf'}"):
        assert requests.get(ui.url + path, timeout=10).status_code == 401, path
    joined = requests.post(f"{ui.url}/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
    assert joined.status_code == 401
    wrong = requests.post(f"{ui.url}/login", data={"username": "ann", "password": "guess"}, timeout=10)
    assert wrong.status_code == 400
    session = requests.Session()
    assert session.post(f"{ui.url}/login", data={"username": "ann", "password": "s3cret"}, timeout=10).ok
    assert session.get(ui.url + "/config", timeout=10).status_code == 200
    assert session.get(export, timeout=10).content == b"GGUF export"  # exports are offered for download
    # logged in or not, nothing else is served: not outside the workspace, not the rest of it
    for path in ("/etc/passwd", tmp_path.parent, tmp_path / "notes.txt", tmp_path / ".qlora-ui" / "ui.lock"):
        assert session.get(f"{ui.url}/gradio_api/file={path}", timeout=10).status_code == 403, path
    upload = requests.post(f"{ui.url}/gradio_api/upload", files={"files": ("a.html", b"<script></script>")})
    assert upload.status_code == 401


def test_one_ui_per_workspace_and_one_line_errors(tmp_path, start_ui):
    first = start_ui(tmp_path)

    def run(*args, env=None):
        import os

        return subprocess.run(
            [sys.executable, "-m", "qlora_platform.cli", "ui", "--workspace", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **(env or {})},
        )

    second = run("--port", "1")
    assert second.returncode == 2 and second.stderr.startswith("error: another qlora ui serves the workspace")
    empty = run("--port", "1", env={"QLORA_UI_AUTH": ""})
    assert (
        empty.returncode == 2
        and empty.stderr.strip() == "error: $QLORA_UI_AUTH: give the login as USER:PASSWORD, both non-empty"
    )
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    taken = subprocess.run(
        [sys.executable, "-m", "qlora_platform.cli", "ui", "--workspace", str(other), "--port", str(first.port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode == 2
    assert taken.stderr.splitlines()[-1].startswith(
        f"error: cannot listen on 127.0.0.1:{first.port} (the port is taken"
    )
    assert "Traceback" not in taken.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "qlora_platform.cli", "ui", "--workspace", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "is not a folder" in missing.stderr and "Traceback" not in missing.stderr


def test_the_tabs_refuse_paths_outside_the_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "p.yaml").write_text("training:\n  max_steps: 2\noutput:\n  dir: runs/p\n")
    app = App(Options(Workspace(tmp_path)))
    values = preset_values("configs/p.yaml")
    shown = [to_widget(f, values[f.key]) for f in fields()]
    argv, cfg = app.train_plan("configs/p.yaml", shown)
    assert argv == ["train", "--config", "configs/p.yaml"] and cfg.output.dir == "runs/p"
    escape = {"output.dir": "../elsewhere", "data.train_file": "/etc/passwd", "data.eval_file": "../x.jsonl"}
    for key, value in escape.items():
        edited = [value if f.key == key else v for f, v in zip(fields(), shown)]
        with pytest.raises(UserError, match=rf"^{key}: '.*' is outside the workspace"):
            app.train_plan("configs/p.yaml", edited)
    with pytest.raises(UserError, match="^preset: .*outside the workspace"):
        app.train_plan("../p.yaml", shown)
    with pytest.raises(UserError, match="^adapter: .*outside the workspace"):
        app.start_eval("../../runs/x/final_adapter", "")
    with pytest.raises(UserError, match="^input: .*outside the workspace"):
        app.prepare("a file or folder in the workspace", None, "/etc", "qa", 0.1, "data")
    with pytest.raises(UserError, match="^output folder: .*outside the workspace"):
        app.prepare("the sample set", None, "", "qa", 0.1, "../data")
    (tmp_path / "runs" / "x" / "final_adapter").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "final_adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="^holdout file: .*outside the workspace"):
        app.start_eval("runs/x/final_adapter", "../held.jsonl")
    with pytest.raises(UserError, match="^benchmark prompts: .*outside the workspace"):
        app.start_eval("runs/x/final_adapter", "", "/etc/prompts.json")
    with pytest.raises(UserError, match="^output folder: .*outside the workspace"):
        app.start_export("runs/x/final_adapter", ["Q8_0"], "../out", False)
    with pytest.raises(UserError, match="^output folder: 'runs/x' is not a folder under exports/"):
        app.start_export("runs/x/final_adapter", ["Q8_0"], "runs/x", False)
    with pytest.raises(UserError, match="^run: .*outside the workspace"):
        app.compare(["../elsewhere"])
    local_model = [("/opt/model" if f.key == "model.name" else v) for f, v in zip(fields(), shown)]
    with pytest.raises(UserError, match="^model.name: '/opt/model' is outside the workspace"):
        app.train_plan("configs/p.yaml", local_model)
    (tmp_path / "configs" / "away.yaml").write_text("output:\n  dir: /tmp/away\n")
    away = preset_values("configs/away.yaml")
    with pytest.raises(UserError, match="^output.dir: '/tmp/away' is outside the workspace"):
        app.train_plan("configs/away.yaml", [to_widget(f, away[f.key]) for f in fields()])
    assert app.jobs.current() is None  # nothing was started
