"""Where training metrics go: TensorBoard always, Weights & Biases on request, JSONL for reports.

    tracker = Tracker(out_dir, ["tensorboard", "wandb"], cfg)
    tracker.log({"loss": 1.2, "lr": 2e-4}, step=10)
    tracker.close()

`<out_dir>/train_log.jsonl` gets every record (the eval plots read it); a
resumed run first cuts it back to the step it resumes from (`truncate_log`), so
each step appears once. TensorBoard events go to `<out_dir>/logs`. W&B runs offline when no API key is
configured, so it never blocks on a login.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError

LOG_FILE = "train_log.jsonl"


def truncate_log(out_dir: Path, step: int) -> int:
    """Drop the records after `step` (and a line cut short by a kill) from the run's log, so a
    run resumed at `step` logs the later steps once. Returns how many lines were dropped."""
    path = Path(out_dir) / LOG_FILE
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(kept)


class Tracker:
    def __init__(self, out_dir: Path, report_to: list[str], cfg):
        self.jsonl = (Path(out_dir) / LOG_FILE).open("a", encoding="utf-8")
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "logs"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise UserError(
                    "report_to includes 'wandb' but the package is missing: pip install 'qlora-platform[wandb]'"
                ) from None
            if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                os.environ["WANDB_MODE"] = "offline"  # no login: keep the run local, sync later
            self.wandb = wandb.init(
                project=cfg.training.wandb_project, dir=str(out_dir), config=cfg.model_dump(), name=Path(out_dir).name
            )

    def log(self, record: dict, step: int) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for key, value in scalars.items():
                group = "eval" if key.startswith("eval_") else "train"
                self.tb.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class NullTracker:
    """What processes other than the first of a multi-process run log to: nothing."""

    def log(self, record: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass
