"""`qlora push`: a trained LoRA adapter published to the Hugging Face Hub, in one commit.

    plan = plan_push("runs/demo", "alice/stdlib-assistant", gguf="runs/demo/gguf", domain="Python")
    print(format_plan(plan))                       # what --dry-run prints
    url = push(plan, overwrite=False)              # needs a token with write access

What is sent: the adapter folder's files (adapter_config.json, the weights, the tokenizer and chat
template saved beside them; never optimizer, scheduler, RNG or trainer state), a model card
(models/model_card.py, with the run's eval/eval.json as its `model-index`) in place of the
folder's README.md, and with `--gguf DIR` the folder's *.gguf files and Ollama Modelfile under
`gguf/`. An adapter trained on a bundled or cached model records a path of this machine as its
base model; the published adapter_config.json names the base model's hub id instead, so PEFT
loads it anywhere.

The hub calls go through huggingface_hub (whoami, repo info, create repo, preupload,
validate-yaml, commit), at $HF_ENDPOINT when it is set. Every failure is one `UserError` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..infer.load import adapter_run_config, resolve_adapter_dir, run_config_for
from ..models.loader import check_adapter_folder
from ..models.model_card import hub_base_model, render_model_card

CARD = "README.md"
GGUF_DIR = "gguf"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Training state that may sit in an adapter folder (a checkpoint-N): of no use to a user of the
# adapter, and a pickle (*.pt) runs code when loaded.
_TRAINING_STATE = re.compile(r"^(trainer_state\.json|training_args\.bin|.*\.(pt|pth|tmp))$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass
class Upload:
    """One file of the commit: `content` when set (generated, or a local file changed), else the
    local file `source` as it is."""

    path_in_repo: str
    size: int
    source: Path | None = None
    content: bytes | None = None
    note: str = ""


@dataclass
class PushPlan:
    repo_id: str
    private: bool
    adapter_dir: Path
    files: list[Upload]
    card: str
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or "--" in repo_id or repo_id.endswith(".git"):
        raise UserError(
            f"--repo '{repo_id}' is not a hub repository id: write USER/NAME (letters, digits, '-', '_', '.'), "
            f"for example alice/stdlib-assistant"
        )
    return repo_id


def format_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def adapter_files(adapter_dir: Path) -> tuple[list[Path], list[str]]:
    """(files to send, names left out) of an adapter folder, relative paths in repository order.
    The folder's own README.md is left out: the generated card replaces it."""
    send, left_out = [], []
    for path in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(adapter_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if _TRAINING_STATE.match(path.name):
            left_out.append(rel.as_posix())
        elif rel.as_posix() != CARD:
            send.append(rel)
    return send, left_out


def _read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON ({type(err).__name__}); is the adapter complete?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a PEFT adapter config (a JSON object); is the adapter complete?")
    return data


def _adapter_config(adapter_dir: Path, data: dict, cfg: Config, notes: list[str]) -> Upload:
    """adapter_config.json, naming the base model by its hub id where the local one is a path."""
    path = adapter_dir / "adapter_config.json"
    local, hub = data.get("base_model_name_or_path"), hub_base_model(cfg.model.name)
    if hub is None:
        notes.append(
            f"the base model '{cfg.model.name}' is not a hub model: the card names no base_model, and "
            f"users of the adapter load the base themselves"
        )
    if hub is None or local == hub:
        return Upload("adapter_config.json", path.stat().st_size, source=path)
    data["base_model_name_or_path"] = hub
    # PEFT's own layout (indent 2, sorted keys), so the file differs from the local one in this key only.
    content = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    note = f"base_model_name_or_path: {local} -> {hub}"
    return Upload("adapter_config.json", len(content), source=path, content=content, note=note)


def _read_json(path: Path, notes: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        notes.append(f"{path} is unreadable ({type(err).__name__}): the card leaves it out")
        return None
    return data if isinstance(data, dict) else None


def _eval_report(run_dir: Path, adapter_dir: Path, notes: list[str]) -> dict | None:
    """The run's eval/eval.json, when it scores this adapter (not another checkpoint of the run)."""
    path = run_dir / "eval" / "eval.json"
    report = _read_json(path, notes)
    if report is None:
        return None
    scored = Path(str(report.get("adapter") or adapter_dir)).name
    if scored != adapter_dir.name:
        notes.append(f"{path} scores {scored}, not {adapter_dir.name}: the card has no evaluation")
        return None
    return report


def _gguf_files(gguf: str | Path) -> list[Upload]:
    folder = Path(gguf).expanduser()
    if not folder.is_dir():
        raise UserError(f"--gguf '{gguf}' is not a folder; give the --out folder of 'qlora export gguf'")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"--gguf '{gguf}' holds no .gguf file; make them with 'qlora export gguf --out {gguf}'")
    if (folder / "Modelfile").is_file():
        files.append(folder / "Modelfile")
    return [Upload(f"{GGUF_DIR}/{f.name}", f.stat().st_size, source=f) for f in files]


def plan_push(
    adapter: str | Path,
    repo_id: str,
    private: bool = False,
    gguf: str | Path | None = None,
    domain: str | None = None,
) -> PushPlan:
    """Everything a push sends, read from disk; nothing touches the network."""
    check_repo_id(repo_id)
    if domain is not None and (not domain.strip() or "\n" in domain):
        raise UserError("--domain takes one line of text, for example 'Python standard library'")
    adapter_dir = resolve_adapter_dir(adapter)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder '{adapter_dir}' does not exist; give <run> or <run>/final_adapter")
    check_adapter_folder(adapter_dir)
    names, left_out = adapter_files(adapter_dir)
    if not any(n.as_posix() in WEIGHTS for n in names):
        raise UserError(f"'{adapter_dir}' has no adapter weights ({' or '.join(WEIGHTS)}); is the adapter complete?")

    notes: list[str] = []
    adapter_config = _read_adapter_config(adapter_dir)
    run_config = run_config_for(adapter_dir)
    if run_config is None and not adapter_config.get("base_model_name_or_path"):
        raise UserError(
            f"cannot tell the base model of '{adapter_dir}': no run config.yaml beside it and no "
            f"base_model_name_or_path in its adapter_config.json"
        )
    cfg = adapter_run_config(adapter_dir, log=lambda _: None)
    run_dir = run_config.parent if run_config else adapter_dir.parent
    if run_config is None:
        notes.append(f"no run config.yaml beside '{adapter_dir}': the card shows the default settings")
    steps = None
    summary = None
    if adapter_dir.name == "final_adapter":
        summary = _read_json(run_dir / "train_summary.json", notes)
    elif re.fullmatch(r"checkpoint-\d+", adapter_dir.name):
        steps = int(adapter_dir.name.split("-")[1])
    report = _eval_report(run_dir, adapter_dir, notes)
    tokenizer = any(n.as_posix() in TOKENIZER for n in names)
    if not tokenizer:
        notes.append(f"no tokenizer beside '{adapter_dir}' (a checkpoint holds none): the card loads the base's")

    files = [_adapter_config(adapter_dir, adapter_config, cfg, notes)]
    files += [
        Upload(n.as_posix(), (adapter_dir / n).stat().st_size, source=adapter_dir / n)
        for n in names
        if n.as_posix() != "adapter_config.json"
    ]
    ggufs = _gguf_files(gguf) if gguf else []
    card = render_model_card(
        cfg,
        summary=summary,
        steps=steps,
        eval_report=report,
        domain=domain.strip() if domain else None,
        repo_id=repo_id,
        gguf_files=[g.path_in_repo for g in ggufs],
        tokenizer=tokenizer,
    )
    content = card.encode()
    files += ggufs + [Upload(CARD, len(content), content=content, note="model card, below")]
    return PushPlan(repo_id, private, adapter_dir, files, card, left_out, notes)


def format_plan(plan: PushPlan, endpoint: str | None = None) -> str:
    """What --dry-run prints: the repository, its visibility, each file and the card."""
    endpoint = endpoint or hub_endpoint()
    total = sum(f.size for f in plan.files)
    width = max(len(f.path_in_repo) for f in plan.files)
    lines = [
        f"repo: {plan.repo_id} ({endpoint}/{plan.repo_id})",
        f"visibility: {'private' if plan.private else 'public'} (when the push creates it)",
        f"files: {len(plan.files)}, {format_size(total)}",
    ]
    for f in plan.files:
        origin = f"<- {f.source}" if f.source else "(generated)"
        origin += " (changed)" if f.source and f.content is not None else ""
        extra = f"  [{f.note}]" if f.note else ""
        lines.append(f"  {f.path_in_repo:<{width}}  {format_size(f.size):>10}  {origin}{extra}")
    if plan.left_out:
        lines.append(f"left out (training state): {', '.join(plan.left_out)}")
    lines += [f"note: {n}" for n in plan.notes]
    lines += ["", f"--- {CARD} ---", plan.card.rstrip(), f"--- end of {CARD} ---"]
    return "\n".join(lines)


def hub_endpoint() -> str:
    """$HF_ENDPOINT read now (huggingface_hub reads it once, at import), else the hub's."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_token(repo_id: str) -> str:
    """$HF_TOKEN or huggingface_hub's stored login."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception:  # noqa: BLE001 - a failed token exchange (OIDC) is the same as no token here
        token = None
    if not token:
        raise UserError(f"no Hugging Face token: set HF_TOKEN or run 'hf auth login' (write access to {repo_id})")
    return token


def _refused(repo_id: str, status: int | str, endpoint: str) -> UserError:
    return UserError(
        f"the hub refused the token ({status}): it lacks write access to {repo_id}; make a token with write "
        f"access at {endpoint}/settings/tokens, then set HF_TOKEN or run 'hf auth login'"
    )


@contextlib.contextmanager
def _hub_errors(repo_id: str, endpoint: str, what: str) -> Iterator[None]:
    """Every failure of a hub call as one UserError line."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except UserError:
        raise
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set: a push needs the hub; unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        if status in (401, 403):
            raise _refused(repo_id, status, endpoint) from None
        message = err.server_message or str(err).strip().splitlines()[0]
        raise UserError(f"the hub answered {status} to {what}: {' '.join(message.split())}") from None
    except (httpx.HTTPError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot reach the hub at {endpoint} ({reason}); check the network, or HF_ENDPOINT") from None
    except ValueError as err:  # the card's metadata refused by validate-yaml, or a malformed answer
        raise UserError(f"the hub refused {what}: {' '.join(str(err).split())}") from None


def push(plan: PushPlan, overwrite: bool = False, log: Callable[[str], None] = print) -> str:
    """Send `plan` as one commit, creating the repository when it is absent; the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, endpoint = plan.repo_id, hub_endpoint()
    token = hub_token(repo_id)
    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE is set: a push needs the hub; unset HF_HUB_OFFLINE")
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo_id, endpoint, "whoami"):
        me = api.whoami()
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise _refused(repo_id, "a read-only token", endpoint)

    with _hub_errors(repo_id, endpoint, f"the repo info of {repo_id}"):
        try:
            info = api.repo_info(repo_id, repo_type="model")
        except HfHubHTTPError as err:
            if err.response is None or err.response.status_code != 404:
                raise
            info = None
    exists_line = (
        f"{repo_id} already exists on the hub; pass --overwrite to push a new commit that replaces its files "
        f"(or choose another --repo)"
    )
    if info is not None and not overwrite:
        raise UserError(exists_line)
    if info is None:
        with _hub_errors(repo_id, endpoint, f"creating {repo_id}"):
            try:
                api.create_repo(repo_id, repo_type="model", private=plan.private)
            except HfHubHTTPError as err:
                if err.response is not None and err.response.status_code == 409:
                    raise UserError(exists_line) from None
                raise
        log(f"created {'private' if plan.private else 'public'} repo {endpoint}/{repo_id}")
    elif plan.private and not info.private:
        log(f"note: {repo_id} exists and is public; --private applies to a new repo (change it in its settings)")

    operations = []
    for f in plan.files:
        log(f"  {f.path_in_repo} ({format_size(f.size)})")
        data = f.content if f.content is not None else f.source
        assert data is not None, f.path_in_repo  # an Upload has content or a source
        operations.append(CommitOperationAdd(f.path_in_repo, data))
    message = f"qlora push: {plan.adapter_dir.parent.name}/{plan.adapter_dir.name}"
    with _hub_errors(repo_id, endpoint, f"the commit to {repo_id}"):
        commit = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    log(f"pushed {len(plan.files)} files to {endpoint}/{repo_id} (commit {commit.oid[:10]})")
    return commit.commit_url


def push_adapter(
    adapter: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    gguf: str | Path | None = None,
    domain: str | None = None,
    log: Callable[[str], None] = print,
) -> str | None:
    """`qlora push`: plan, then print it (--dry-run) or send it; the commit's URL when sent."""
    plan = plan_push(adapter, repo_id, private=private, gguf=gguf, domain=domain)
    if dry_run:
        log("dry run: nothing is sent")
        log(format_plan(plan))
        return None
    for note in plan.notes:
        log(f"note: {note}")
    if plan.left_out:
        log(f"left out (training state): {', '.join(plan.left_out)}")
    return push(plan, overwrite=overwrite, log=log)
