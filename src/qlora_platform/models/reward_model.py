"""A trained reward model on the 4-bit base already in memory: its LoRA adapter as a second, frozen
adapter named "reward" beside the policy's, and its scalar head.

    rm = RewardModel.attach(peft_model, "runs/reward/final_adapter")    # the policy, or `qlora eval`'s model
    rewards = rm.score(input_ids, attention_mask)                        # [B] float32, no grad
    rewards = rm.score_sequences([[ids...], ...], pad_id, batch_size=8)  # right-padded for you

A reward run (training.method reward, train/reward.py) saves its adapter and, beside it, the head
as models/value_head.HEAD_FILE. Attaching loads only those few megabytes: the base weights are
shared with the policy, so PPO and GRPO hold one 4-bit base for the policy, the reference (adapter
off) and the reward model. `score` switches to the reward adapter for one forward and then puts
back the adapter that was active, every parameter's requires_grad flag (PEFT's set_adapter makes
the adapter it activates trainable) and every module's train/eval mode.

The reward adapter must fit the base: the same model (by the run config's model.name or the
adapter's base_model_name_or_path), the same hidden size, and LoRA targets the base has.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .bundled import BUNDLED_PREFIX, cache_dir
from .value_head import HEAD_FILE, final_hidden, last_token_hidden, load_head

REWARD_ADAPTER = "reward"


def _normalised(name: str) -> str:
    """A model name as the path or hub id it loads from, so that equal sources compare equal."""
    if name.startswith(BUNDLED_PREFIX):  # where models.bundled.resolve_gguf puts its folder
        return str((cache_dir() / "models" / name[len(BUNDLED_PREFIX) :]).resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _run_model_name(folder: Path) -> str | None:
    """model.name of the run config next to an adapter folder (its own, or its run's)."""
    import yaml

    for candidate in (folder / "config.yaml", folder.parent / "config.yaml"):
        if candidate.is_file():
            try:
                data = yaml.safe_load(candidate.read_text()) or {}
            except yaml.YAMLError:
                return None
            name = (data.get("model") or {}).get("name") if isinstance(data, dict) else None
            return name if isinstance(name, str) else None
    return None


def _check_fits(peft_model, folder: Path, adapter_cfg: dict) -> None:
    """One line when the reward adapter was trained on another base, or targets modules it lacks."""
    base = peft_model.get_base_model()
    here = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", "")
    trained_on = [n for n in (_run_model_name(folder), adapter_cfg.get("base_model_name_or_path")) if n]
    if here and trained_on and _normalised(here) not in {_normalised(n) for n in trained_on}:
        raise UserError(
            f"reward adapter '{folder}' was trained on '{trained_on[0]}', but this model is '{here}'; train the "
            f"reward model (training.method reward) on the same model.name as this run"
        )
    targets = adapter_cfg.get("target_modules")
    if isinstance(targets, list):  # a string is a regex or "all-linear": PEFT matches it itself
        # PEFT's rule: a target is a module's full name or the end of it after a dot.
        names = [name for name, _ in base.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise UserError(
                f"reward adapter '{folder}' adapts {', '.join(missing)}, which this model does not have; it was "
                f"trained on another architecture: train the reward model on this run's model.name"
            )


def _restore_adapter(peft_model, name) -> None:
    if isinstance(name, str):
        peft_model.set_adapter(name)
    else:  # several active adapters: the tuner takes the list
        peft_model.base_model.set_adapter(name)


class RewardModel:
    """The "reward" adapter on a PeftModel's base and its head (module doc); build it with `attach`, or
    directly on a model whose adapter `adapter` is the reward run's own (`qlora eval` of a reward run)."""

    def __init__(self, model, head, folder: Path, adapter: str = REWARD_ADAPTER):
        self.model, self.head, self.folder, self.adapter = model, head, folder, adapter

    @classmethod
    def attach(cls, peft_model, folder: str | Path) -> RewardModel:
        """Load the reward run's final_adapter `folder` as the frozen adapter "reward" of `peft_model`
        (its active adapter and trainable parameters unchanged); one line when `folder` is not a reward
        adapter or does not fit the base."""
        folder = Path(folder)
        config_file = folder / "adapter_config.json"
        if not folder.is_dir() or not config_file.is_file() or not (folder / HEAD_FILE).is_file():
            raise UserError(
                f"'{folder}' is not a reward model (it needs adapter_config.json and {HEAD_FILE}); point "
                f"alignment.reward_adapter at the final_adapter of a training.method reward run"
            )
        try:
            adapter_cfg = json.loads(config_file.read_text())
        except ValueError:
            raise UserError(f"{config_file} is not valid JSON; train the reward model again") from None
        _check_fits(peft_model, folder, adapter_cfg)
        if REWARD_ADAPTER in peft_model.peft_config:
            raise UserError(f"this model already has a '{REWARD_ADAPTER}' adapter; attach one reward model")
        base = peft_model.get_base_model()
        head = load_head(folder, base.config.get_text_config().hidden_size)
        flags = [(p, p.requires_grad) for p in peft_model.parameters()]
        active = peft_model.active_adapter
        try:
            peft_model.load_adapter(str(folder), adapter_name=REWARD_ADAPTER, is_trainable=False)
        except (ValueError, KeyError, RuntimeError) as err:
            raise UserError(
                f"reward adapter '{folder}' does not fit this model ({str(err).splitlines()[0]}); train it on the "
                f"same model.name"
            ) from None
        _restore_adapter(peft_model, active)
        for param, flag in flags:
            param.requires_grad_(flag)
        for name, param in peft_model.named_parameters():
            if f".{REWARD_ADAPTER}." in name:
                param.requires_grad_(False)
        device = next(p.device for p in peft_model.parameters())
        return cls(peft_model, head.to(device).requires_grad_(False), folder)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] float32 rewards of right-padded rows: the head on each row's last attended token's final
        hidden state, computed with the reward adapter; the model is left as it was found."""
        model = self.model
        active = model.active_adapter
        flags = [(p, p.requires_grad) for p in model.parameters()]
        modes = [(m, m.training) for m in model.modules()]
        device = next(self.head.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        try:
            model.set_adapter(self.adapter)
            model.eval()  # no dropout: a reward is a function of the text
            hidden = final_hidden(model, input_ids, attention_mask)
            return self.head(last_token_hidden(hidden, attention_mask))
        finally:
            _restore_adapter(model, active)
            for param, flag in flags:
                param.requires_grad_(flag)
            for module, training in modes:
                module.training = training

    def score_sequences(self, sequences: list[list[int]], pad_id: int, batch_size: int = 8) -> torch.Tensor:
        """[N] float32 rewards of token-id sequences, `batch_size` a forward (right-padded)."""
        out = torch.zeros(len(sequences))
        for k in range(0, len(sequences), batch_size):
            chunk = sequences[k : k + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, seq in enumerate(chunk):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            out[k : k + len(chunk)] = self.score(ids, mask).cpu()
        return out
