"""Loading a trained adapter (or a plain model) for inference, with the run's own settings.

    loaded = load_for_inference(adapter="runs/demo/final_adapter")
    loaded.engine.stream(...)                    # the tuned model
    with loaded.base_only():                     # the same weights, adapter off
        ...

An adapter folder is `<run>/final_adapter` or `<run>/checkpoint-N`; the run's
`config.yaml` next to it says which base model, quantization and sequence length
were used, so evaluation and chat see the model exactly as it was trained.
Without a run config the adapter's own `base_model_name_or_path` is used.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, load_config
from ..errors import UserError
from ..models.loader import (
    check_adapter_folder,
    load_adapter,
    load_base_model,
    load_tokenizer,
    match_training_precision,
    pick_device,
)
from .engine import Engine


@dataclass
class Loaded:
    model: object
    tokenizer: object
    engine: Engine
    cfg: Config
    device: str
    adapter: str | None
    model_name: str

    @contextlib.contextmanager
    def base_only(self):
        """The base model's behaviour: LoRA layers switched off (no second copy in memory)."""
        if self.adapter is None:
            yield
            return
        with self.model.disable_adapter():
            yield


def run_config_for(adapter_dir: Path) -> Path | None:
    for candidate in (adapter_dir / "config.yaml", adapter_dir.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter folder, or a run folder whose final_adapter (else newest checkpoint) is meant."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() or not path.is_dir():
        return path
    if (path / "final_adapter" / "adapter_config.json").is_file():
        return path / "final_adapter"
    checkpoints = sorted(
        (int(c.name.split("-")[1]), c)
        for c in path.glob("checkpoint-[0-9]*")
        if c.name.split("-")[1].isdigit() and (c / "adapter_config.json").is_file()
    )
    return checkpoints[-1][1] if checkpoints else path


def check_adapter_dir(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise UserError(
            f"adapter folder '{adapter_dir}' does not exist; it is <run>/final_adapter "
            f"(for the demo: runs/demo/final_adapter)"
        )
    check_adapter_folder(adapter_dir)


def adapter_run_config(
    adapter_dir: Path,
    config: str | None = None,
    overrides: dict | None = None,
    trust_remote_code: bool = False,
    log=print,
) -> Config:
    """The training run's config of an adapter; without one, defaults with the adapter's own base model.

    An adapter folder may come from anywhere, so its config.yaml never decides whether the
    model's own Python runs: `trust_remote_code` is the caller's (the command line's) alone.
    """
    run_cfg = config or run_config_for(adapter_dir)
    cfg = load_config(run_cfg, overrides or {})
    if cfg.model.trust_remote_code and not trust_remote_code:
        log(
            f"note: {run_cfg} asks for model.trust_remote_code; ignored (code shipped with a model or "
            f"adapter runs only with --trust-remote-code on the command line)"
        )
    cfg.model.trust_remote_code = trust_remote_code
    if run_cfg is None:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"cannot tell the base model of '{adapter_dir}': no run config.yaml next to it "
                f"and no base_model_name_or_path; pass --config of the training run"
            )
        cfg.model.name = base
    return cfg


def adapter_tokenizer(cfg: Config, adapter_dir: Path | None):
    """The tokenizer saved with the adapter (the one training used, pad token included), else the model's."""
    saved = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    return load_tokenizer(cfg.model, source=str(adapter_dir) if saved else None)


def load_for_inference(
    adapter: str | None = None,
    model: str | None = None,
    config: str | None = None,
    device: str = "auto",
    load_in_4bit: bool | None = None,
    overrides: dict | None = None,
    trust_remote_code: bool = False,
    log=print,
    warm_up: bool = True,
) -> Loaded:
    """Exactly one of `adapter` (a LoRA folder) or `model` (hub id, folder, .gguf, bundled:NAME).

    `warm_up=False` leaves the model untouched by any forward pass, so that scoring under
    models.loader.training_numerics sees the weights as training did."""
    if bool(adapter) == bool(model):
        raise UserError("give either --adapter DIR (a trained LoRA adapter) or --model NAME, not both or neither")
    adapter_dir = Path(adapter) if adapter else None
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
        cfg = adapter_run_config(adapter_dir, config, overrides, trust_remote_code, log)
    else:
        assert model is not None  # exactly one of adapter and model, checked above
        cfg = load_config(config, overrides or {})
        cfg.model.name = model
        cfg.model.trust_remote_code = trust_remote_code
    if trust_remote_code:
        log(f"--trust-remote-code: Python code shipped with '{cfg.model.name}' may run")
    if load_in_4bit is not None:
        cfg.quantization.load_in_4bit = load_in_4bit
    dev = pick_device(device if device != "auto" else cfg.training.device)
    tokenizer = adapter_tokenizer(cfg, adapter_dir)
    base = load_base_model(cfg, dev, for_training=False)
    match_training_precision(base, cfg, dev)
    net = load_adapter(base, adapter_dir) if adapter_dir else base
    net.eval()
    engine = Engine(net, tokenizer)
    if warm_up:
        engine.warm_up()
    return Loaded(
        model=net,
        tokenizer=tokenizer,
        engine=engine,
        cfg=cfg,
        device=dev,
        adapter=str(adapter_dir) if adapter_dir else None,
        model_name=cfg.model.name,
    )
