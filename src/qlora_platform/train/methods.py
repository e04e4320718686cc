"""One trainer per training.method, all on the platform's Trainer (train/trainer.py).

    trainer = make_trainer(cfg, resume=False, overwrite=False)
    summary = trainer.train()

Every method shares the loop, checkpoints, resume, signals, out-of-memory handling, logging and
the final adapter; each module overrides the data, the loss and the evaluation.
"""

from __future__ import annotations

import importlib

from ..config import Config
from .trainer import Trainer

# training.method -> (module of qlora_platform.train, class)
TRAINERS = {
    "sft": ("trainer", "Trainer"),
    "reward": ("reward", "RewardTrainer"),
    "dpo": ("dpo", "DPOTrainer"),
    "orpo": ("orpo", "ORPOTrainer"),
    "kto": ("kto", "KTOTrainer"),
    "ppo": ("ppo", "PPOTrainer"),
    "grpo": ("grpo", "GRPOTrainer"),
}


def trainer_class(method: str) -> type[Trainer]:
    module, name = TRAINERS[method]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def make_trainer(cfg: Config, **kwargs) -> Trainer:
    """The trainer of cfg.training.method; `kwargs` as Trainer takes them (resume, log, overwrite)."""
    return trainer_class(cfg.training.method)(cfg, **kwargs)
