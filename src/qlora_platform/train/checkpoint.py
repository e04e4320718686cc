"""Atomic, resumable training checkpoints under `<output_dir>/checkpoint-N`.

A checkpoint is written into `checkpoint-N.tmp`, flushed to disk (fsync of every
file and of the folder) and renamed into place once complete, so a crash, a power
cut or Ctrl-C mid-write never leaves a half checkpoint that `--resume` would pick;
a failed write (a full disk) removes its `.tmp` folder, and the next save removes
any left by a killed process. It holds the LoRA adapter (safetensors), the
optimizer, scheduler and RNG states, and `trainer_state.json` (step, losses, the
config). Only the newest `save_total_limit` checkpoints are kept, pruned after the
new one is on disk. Every file is read back with `weights_only=True`: a crafted
checkpoint cannot run code.

    save_checkpoint(out_dir, step, model, optimizer, scheduler, state, keep=3)
    path = newest_loadable(out_dir, log)         # Path or None, skipping damaged ones
    state = load_checkpoint(path, model, optimizer, scheduler)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch

from ..errors import UserError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^checkpoint-\d+\.tmp$")


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


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint cannot be loaded (an empty or truncated file, or a pickle holding
    more than tensors and numbers), or None when every file of it reads back."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        step = json.loads((path / STATE_FILE).read_text())["global_step"]
        if not isinstance(step, int):
            raise ValueError("global_step is not a number")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{STATE_FILE} is unreadable ({type(err).__name__})"
    weights = path / "adapter_model.safetensors"
    try:
        load_file(str(weights))
    except (OSError, SafetensorError) as err:
        return f"{weights.name} is missing or truncated ({type(err).__name__})"
    for file in sorted(path.glob("*.pt")):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return f"{file.name} holds objects other than tensors and numbers (refused: loading it could run code)"
        except (OSError, EOFError, RuntimeError, ValueError) as err:
            return f"{file.name} is empty or truncated ({type(err).__name__})"
    return None


def newest_loadable(out_dir: str | Path, log=print) -> Path | None:
    """The newest checkpoint whose files all read back; a damaged newer one is named and passed
    over. None when there is no checkpoint; a UserError when none of them loads."""
    found = list_checkpoints(out_dir)
    problems = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log(f"--resume: falling back to {path.name}")
            return path
        problems.append(f"{path.name}: {problem}")
        log(f"--resume: {path} cannot be loaded: {problem}")
    if problems:
        raise UserError(
            f"--resume: no checkpoint in {out_dir} can be loaded ({'; '.join(problems)}); delete "
            f"the damaged checkpoint folders to start from step 0, or start again with --overwrite"
        )
    return None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames). Some filesystems refuse fsync on a folder;
    there the rename is as durable as the filesystem makes it."""
    with contextlib.suppress(OSError):
        _fsync(path)


def sync_tree(folder: Path) -> None:
    """Every file under `folder`, and the folder itself, flushed to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path)
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def remove_stale_tmp(out_dir: Path, keep: Path | None = None) -> None:
    """`checkpoint-N.tmp` folders left by a save that was killed or ran out of disk."""
    if not out_dir.is_dir():
        return
    for child in out_dir.iterdir():
        if _TMP.match(child.name) and child != keep:
            shutil.rmtree(child, ignore_errors=True)


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a complete folder into place as `final`, replacing an older one: the new files are on
    disk first, and at no moment is `final` a mix of old and new files."""
    sync_tree(tmp)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    out_dir: str | Path, step: int, model, optimizer, scheduler, state: dict, keep: int, extra=None
) -> Path:
    """checkpoint-`step` (module doc); `extra(folder)` adds files (a reward or value head) beside the adapter."""
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"checkpoint-{step}.tmp"
    remove_stale_tmp(out_dir)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if extra is not None:
            extra(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        publish(tmp, final, {**state, "global_step": step}, out_dir, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not leave a half folder behind
        raise
    return final


def publish(tmp: Path, final: Path, state: dict, out_dir: Path, keep: int) -> None:
    """Write trainer_state.json last (its presence marks the checkpoint complete), flush the folder
    to disk, move it into place, then keep the newest `keep` checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    replace_folder(tmp, final)
    remove_stale_tmp(out_dir)
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
        raise UserError(
            f"checkpoint '{path}' does not match this model/LoRA config "
            f"(unexpected keys such as {result.unexpected_keys[0]})"
        )


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return the saved trainer state."""
    load_adapter_weights(path, model)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    return load_training_state(path, optimizer, scheduler, device)


def _load(file: Path, map_location=None):
    """A checkpoint's .pt file, tensors and plain data only: a pickle that would build any other
    object (and could run code doing so) is refused."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"checkpoint file '{file}' holds objects other than tensors and numbers; it is "
            f"refused because loading it could run code (delete that checkpoint)"
        ) from None


def load_training_state(path: Path, optimizer, scheduler, device, suffix: str = "") -> dict:
    """Optimizer, scheduler and RNG from a checkpoint, and its trainer state. `suffix` picks a
    process's own optimizer and RNG files in a multi-process checkpoint ("-rank1")."""
    try:
        optimizer.load_state_dict(_load(path / f"optimizer{suffix}.pt", map_location=device))
    except ValueError as err:  # e.g. saved per tensor, resumed with one flat buffer (fast kernels)
        raise UserError(
            f"checkpoint '{path}': the optimizer state does not fit this run's parameters "
            f"({err}); resume with the settings it was saved with, or start a new "
            f"output.dir"
        ) from None
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    rng = _load(path / f"rng_state{suffix}.pt")  # random.getstate() is a tuple of ints: plain data
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text())
