"""Atomic, resumable training checkpoints under `<output_dir>/checkpoint-N`.

A checkpoint is written into `checkpoint-N.tmp` and renamed into place once
complete, so a crash or Ctrl-C mid-write never leaves a half checkpoint that
`--resume` would pick. It holds the LoRA adapter (safetensors), the optimizer,
scheduler and RNG states, and `trainer_state.json` (step, losses, the config).
Only the newest `save_total_limit` checkpoints are kept.

    save_checkpoint(out_dir, step, model, optimizer, scheduler, state, keep=3)
    latest = latest_checkpoint(out_dir)          # Path or None
    state = load_checkpoint(latest, model, optimizer, scheduler)
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from ..errors import UserError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a folder without trainer_state.json is incomplete)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for child in out_dir.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int) -> Path:
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng_state.pt")
    publish(tmp, final, {**state, "global_step": step}, out_dir, keep)
    return final


def publish(tmp: Path, final: Path, state: dict, out_dir: Path, keep: int) -> None:
    """Write trainer_state.json last (its presence marks the checkpoint complete), move the folder
    into place, keep the newest `keep` checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_adapter_weights(path: Path, model) -> None:
    """The checkpoint's LoRA weights into `model`, refusing a checkpoint of another model/LoRA."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint '{path}' has no adapter_model.safetensors; delete it and resume again")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint '{path}' does not match this model/LoRA config "
                        f"(unexpected keys such as {result.unexpected_keys[0]})")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return the saved trainer state."""
    load_adapter_weights(path, model)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    return load_training_state(path, optimizer, scheduler, device)


def load_training_state(path: Path, optimizer, scheduler, device, suffix: str = "") -> dict:
    """Optimizer, scheduler and RNG from a checkpoint, and its trainer state. `suffix` picks a
    process's own optimizer and RNG files in a multi-process checkpoint ("-rank1")."""
    try:
        optimizer.load_state_dict(torch.load(path / f"optimizer{suffix}.pt", map_location=device,
                                             weights_only=True))
    except ValueError as err:   # e.g. saved per tensor, resumed with one flat buffer (fast kernels)
        raise UserError(f"checkpoint '{path}': the optimizer state does not fit this run's parameters "
                        f"({err}); resume with the settings it was saved with, or start a new "
                        f"output.dir") from None
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / f"rng_state{suffix}.pt", weights_only=False)  # python RNG state is a tuple
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text())
