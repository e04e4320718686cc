"""The folder the web UI works in, and the only files it touches.

Every path a person types or picks in the UI goes through `Workspace.path`, which
resolves it (relative to the workspace, symlinks followed) and refuses anything that
lands outside. Uploads are copied into `uploads/` under a size limit. The lists the
tabs offer (presets, data files, runs, adapters, exports) are read from the folder
each time, so files the CLI writes show up without a restart.

    ws = Workspace("~/my-project", max_upload_mb=200)
    ws.path("data/train.jsonl")        # -> absolute path inside the workspace
    ws.path("../../etc/passwd")        # -> UserError: outside the workspace
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data.prepare import RECORD_SUFFIXES
from ..data.sources import DOC_SUFFIXES
from ..errors import UserError

STATE_DIR = ".qlora-ui"  # the UI's own files: job logs and state, Gradio's upload cache
UPLOAD_SUFFIXES = RECORD_SUFFIXES | DOC_SUFFIXES  # what `qlora prepare` reads from a folder


@dataclass(frozen=True)
class Workspace:
    root: Path
    max_upload_mb: int = 200

    def __post_init__(self) -> None:
        root = Path(self.root).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"--workspace '{self.root}' is not a folder; create it or pick another")
        object.__setattr__(self, "root", root)

    @property
    def state(self) -> Path:
        path = self.root / STATE_DIR
        path.mkdir(exist_ok=True)
        return path

    def path(self, text: str | Path, what: str = "path") -> Path:
        """`text` (relative to the workspace, or absolute) as an absolute path inside it; else one UserError."""
        raw = str(text).strip()
        if not raw:
            raise UserError(f"{what}: empty; give a path inside the workspace {self.root}")
        path = Path(raw).expanduser()
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise UserError(f"{what}: '{raw}' is outside the workspace {self.root}; the UI reads and writes only there")
        return resolved

    def rel(self, path: Path) -> str:
        """A path inside the workspace as the UI shows it (relative, forward slashes)."""
        return Path(path).resolve().relative_to(self.root).as_posix() or "."

    # -- uploads ------------------------------------------------------------------------
    def save_upload(self, temp_file: str | Path) -> Path:
        """Copy a file Gradio received into uploads/ (name kept, made safe); the size limit holds here too."""
        src = Path(temp_file)
        size = src.stat().st_size
        if size > self.max_upload_mb * 1024 * 1024:
            raise UserError(
                f"upload '{src.name}' is {size / 2**20:.0f} MB, over the limit of {self.max_upload_mb} MB; "
                f"copy it into the workspace instead, or start the UI with a larger --max-upload-mb"
            )
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", src.name).lstrip(".") or "upload"
        if Path(name).suffix.lower() not in UPLOAD_SUFFIXES:
            raise UserError(
                f"upload '{src.name}': not a file qlora prepare reads; give one of {', '.join(sorted(UPLOAD_SUFFIXES))}"
            )
        dest = self.path(f"uploads/{name}", "upload")  # uploads/ itself may not lead out of the workspace
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dest)
        return dest

    # -- what the tabs offer ------------------------------------------------------------
    def _inside(self, paths) -> list[Path]:
        """The paths that resolve inside the workspace (a symlink out of it is left out of every list)."""
        return [p for p in paths if p.resolve().is_relative_to(self.root)]

    def presets(self) -> list[str]:
        """configs/*.yaml of the workspace (the repository's presets when it is a clone)."""
        return sorted(self.rel(p) for p in self._inside((self.root / "configs").glob("*.yaml")))

    def runs(self) -> list[str]:
        """Folders under runs/ (at any depth) that hold a training run: a config.yaml the trainer wrote."""
        found = self._inside((self.root / "runs").rglob("config.yaml"))
        return sorted(self.rel(p.parent) for p in found if not (p.parent / "adapter_config.json").is_file())

    def adapters(self) -> list[str]:
        """Every final_adapter and checkpoint under runs/, newest run first."""
        found = [p.parent for p in self._inside((self.root / "runs").rglob("adapter_config.json"))]
        found.sort(key=lambda p: (p.parent.stat().st_mtime, p.name), reverse=True)
        return [self.rel(p) for p in found]

    def gguf_files(self, folder: Path) -> list[Path]:
        return sorted(folder.glob("*.gguf")) if folder.is_dir() else []
