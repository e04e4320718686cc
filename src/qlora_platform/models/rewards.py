"""Rewards of sampled answers for RL training (training.method ppo, grpo) and for `qlora eval` of such runs.

    functions = load_reward_functions(["qlora_platform.models.rewards:brevity", "my_rewards.py:polite"])
    rewards = total_rewards(functions, prompts, completions)                     # [N] float32
    rewards = total_rewards(functions, prompts, completions, reward_model, ids, mask)

A reward function is named in alignment.reward_functions as 'module:function' (an importable
module) or 'path/to/file.py:function' (a file, relative to the working directory). It is called
once per batch of sampled answers as

    fn(prompts: list[str], completions: list[str]) -> list[float]

with the user's last message of each answer's prompt and the answer's text (special tokens such
as the end-of-turn removed), and returns one finite number per answer; higher is better. The
rewards of every function and, when alignment.reward_adapter is set, the reward model's score
(models/reward_model.py) are summed into one reward per answer.

Two examples ship here, for the docs and the tests: `brevity` (shorter answers score higher) and
`distinct_words` (answers that repeat themselves score lower).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

RewardFunction = Callable[[list[str], list[str]], list[float]]
BUILTIN_PREFIX = "qlora_platform."


def brevity(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for an empty answer, falling linearly to 0 at 200 characters (and 0 beyond)."""
    return [max(0.0, 1.0 - len(text.strip()) / 200) for text in completions]


def distinct_words(prompts: list[str], completions: list[str]) -> list[float]:
    """The share of distinct words among an answer's words (case-insensitive); 0 for an empty answer."""
    out = []
    for text in completions:
        words = text.lower().split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out


def _module_from_file(path: Path, spec: str):
    """The module of a Python file, imported once under a name derived from its resolved path."""
    name = "qlora_reward_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"alignment.reward_functions '{spec}': cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: its error becomes one line
        del sys.modules[name]
        raise UserError(
            f"alignment.reward_functions '{spec}': importing {path} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); fix the file"
        ) from None
    return module


def _import_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):  # not one it imports
            raise UserError(
                f"alignment.reward_functions '{spec}': no module '{module_name}' (give an importable module, "
                f"or a Python file as path/to/file.py:function)"
            ) from None
        raise UserError(
            f"alignment.reward_functions '{spec}': importing {module_name} failed (no module '{err.name}'); "
            f"install it or fix the import"
        ) from None
    except Exception as err:  # noqa: BLE001 - the user's module: its error becomes one line
        raise UserError(
            f"alignment.reward_functions '{spec}': importing {module_name} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); fix the module"
        ) from None


@dataclass(frozen=True)
class NamedReward:
    """A reward function with the spec that named it (messages about its results quote the spec)."""

    spec: str
    fn: RewardFunction

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.fn(prompts, completions)


def load_reward_function(spec: str) -> NamedReward:
    """The function a 'module:function' or 'path/to/file.py:function' spec names (module doc)."""
    where, sep, attr = str(spec).rpartition(":")
    if not sep or not where.strip() or not attr.strip() or not attr.isidentifier():
        raise UserError(
            f"alignment.reward_functions '{spec}': give 'module:function' or 'path/to/file.py:function' "
            f"(e.g. qlora_platform.models.rewards:brevity)"
        )
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"alignment.reward_functions '{spec}': file '{where}' not found (relative to {Path.cwd()})")
        module = _module_from_file(path, spec)
    else:
        module = _import_module(where, spec)
    if not hasattr(module, attr):
        raise UserError(f"alignment.reward_functions '{spec}': {where} has no '{attr}'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(
            f"alignment.reward_functions '{spec}': '{attr}' in {where} is a {type(fn).__name__}, not a function"
        )
    return NamedReward(spec, fn)


def load_reward_functions(specs: list[str]) -> list[NamedReward]:
    """The functions of alignment.reward_functions, in order; one line for the first bad spec."""
    return [load_reward_function(spec) for spec in specs]


def is_builtin(spec: str) -> bool:
    """Whether a spec names a function of this package (code that ships with the platform)."""
    return str(spec).startswith(BUILTIN_PREFIX) and not str(spec).rpartition(":")[0].endswith(".py")


def function_rewards(fn: RewardFunction, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """[N] float32 rewards of one function, checked: one finite number per completion."""
    name = fn.spec if isinstance(fn, NamedReward) else getattr(fn, "__name__", repr(fn))
    try:
        values = fn(list(prompts), list(completions))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's function: its error becomes one line
        raise UserError(
            f"reward function {name} raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(
            f"reward function {name} returned {type(values).__name__} {str(values)[:60]!r}; "
            f"it must return a list of floats, one per completion"
        ) from None
    if len(out) != len(completions):
        raise UserError(
            f"reward function {name} returned {len(out)} values for {len(completions)} completions; "
            f"it must return one float per completion"
        )
    bad = next((v for v in out if not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(f"reward function {name} returned {bad}; rewards must be finite numbers")
    return torch.tensor(out, dtype=torch.float32)


def total_rewards(
    functions: list[RewardFunction],
    prompts: list[str],
    completions: list[str],
    reward_model=None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N] float32 on the CPU: the sum of every function's rewards and, when given, the reward model's
    scores of `input_ids` (prompt + answer rows, right-padded, as the reward model was trained on)."""
    total = torch.zeros(len(completions), dtype=torch.float32)
    for fn in functions:
        total += function_rewards(fn, prompts, completions)
    if reward_model is not None:
        if input_ids is None or attention_mask is None:
            raise ValueError("total_rewards: a reward model needs input_ids and attention_mask")
        total += reward_model.score(input_ids, attention_mask).detach().float().cpu()
    return total
