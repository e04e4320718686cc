"""Workspace: every path the UI is given stays inside the folder; uploads are capped and renamed safely."""

from __future__ import annotations

import pytest

from qlora_platform.errors import UserError
from qlora_platform.ui.workspace import Workspace


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(root, max_upload_mb=1)


def test_paths_inside_resolve_and_outside_are_refused(ws, tmp_path):
    assert ws.path("data/train.jsonl") == ws.root / "data" / "train.jsonl"
    assert ws.path(ws.root / "runs") == ws.root / "runs"
    for outside in ("../secret.txt", "/etc/passwd", "data/../../ws-other", str(tmp_path)):
        with pytest.raises(UserError, match="outside the workspace") as err:
            ws.path(outside, "output.dir")
        assert str(err.value).startswith("output.dir: ")
    with pytest.raises(UserError, match="empty"):
        ws.path("  ")


def test_a_symlink_out_of_the_workspace_is_refused(ws, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (ws.root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the workspace"):
        ws.path("link/file.jsonl")


def test_missing_workspace_is_one_line(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        Workspace(tmp_path / "nope")


def test_uploads_are_capped_typed_and_renamed(ws, tmp_path):
    good = tmp_path / "my data (v2).jsonl"
    good.write_text('{"messages": []}\n')
    saved = ws.save_upload(good)
    assert saved == ws.root / "uploads" / "my_data_v2_.jsonl" and saved.read_text() == good.read_text()
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    with pytest.raises(UserError, match="over the limit of 1 MB"):
        ws.save_upload(big)
    script = tmp_path / "run.sh"
    script.write_text("echo hi")
    with pytest.raises(UserError, match="not a file qlora prepare reads"):
        ws.save_upload(script)
    hidden = tmp_path / ".hidden.jsonl"
    hidden.write_text("{}")
    assert ws.save_upload(hidden) == ws.root / "uploads" / "hidden.jsonl"  # no dotfiles, no path parts


def test_lists_read_the_folder(ws):
    (ws.root / "configs").mkdir()
    (ws.root / "configs" / "a.yaml").write_text("{}")
    run = ws.root / "runs" / "r1"
    (run / "final_adapter").mkdir(parents=True)
    (run / "final_adapter" / "adapter_config.json").write_text("{}")
    (run / "checkpoint-3").mkdir()
    (run / "checkpoint-3" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("{}")
    (run / "final_adapter" / "config.yaml").write_text("{}")  # a copy beside the adapter is not a run
    nested = ws.root / "runs" / "sweep" / "r-8" / "final_adapter"
    nested.mkdir(parents=True)
    (nested / "adapter_config.json").write_text("{}")
    (nested.parent / "config.yaml").write_text("{}")
    assert ws.presets() == ["configs/a.yaml"]
    assert ws.runs() == ["runs/r1", "runs/sweep/r-8"]
    assert sorted(ws.adapters()) == ["runs/r1/checkpoint-3", "runs/r1/final_adapter", "runs/sweep/r-8/final_adapter"]


def test_symlinks_out_of_the_workspace_are_left_out_of_the_lists(ws, tmp_path):
    outside = tmp_path / "outside"
    (outside / "r" / "final_adapter").mkdir(parents=True)
    (outside / "r" / "final_adapter" / "adapter_config.json").write_text("{}")
    (outside / "r" / "config.yaml").write_text("{}")
    (outside / "p.yaml").write_text("{}")
    (ws.root / "runs").symlink_to(outside)
    (ws.root / "configs").symlink_to(outside)
    (ws.root / "uploads").symlink_to(outside)
    assert ws.runs() == [] and ws.adapters() == [] and ws.presets() == []
    upload = tmp_path / "x.jsonl"
    upload.write_text("{}")
    with pytest.raises(UserError, match="^upload: .*outside the workspace"):
        ws.save_upload(upload)
    assert not (outside / "x.jsonl").exists()
