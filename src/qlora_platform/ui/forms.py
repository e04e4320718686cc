"""The Train tab's form, generated from the config schema (no key is listed by hand twice).

Each key of `config.SECTIONS` becomes a `Field`: its widget kind (choice, switch,
number, text), choices, default and the schema's description as help. The common keys
come first; the rest are folded by section. What the form holds turns into the overrides
a `qlora train --config PRESET` command line gets: only the keys that differ from the
preset, so the shown command stays short and is the one a person would type.
"""

from __future__ import annotations

import shlex
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from ..config import SECTIONS, Config, load_config

# The keys most runs change, shown first, in this order; every other key is folded by section.
COMMON = (
    "model.name",
    "data.train_file",
    "data.eval_file",
    "output.dir",
    "training.max_steps",
    "training.epochs",
    "training.learning_rate",
    "training.batch_size",
    "lora.r",
    "data.max_seq_len",
    "data.packing",
)
# list: some of fixed choices (check boxes); words: a free list, typed comma-separated.
Kind = Literal["choice", "switch", "int", "float", "text", "list", "words"]
AUTO = "auto"  # what a choice shows for a key whose null means "decided for the device"


@dataclass(frozen=True)
class Field:
    key: str  # dotted: section.key
    kind: Kind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False  # null allowed (shown as blank, or "auto" for a switch)

    @property
    def label(self) -> str:
        return self.key


def _kind(annotation) -> tuple[Kind, tuple[str, ...], bool]:
    args = get_args(annotation)
    optional = type(None) in args
    if get_origin(annotation) in (Union, types.UnionType):
        args = tuple(a for a in args if a is not type(None))
        literal = [a for a in args if get_origin(a) is Literal]
        if literal:  # e.g. Literal["all-linear"] | list[str]: a choice or a typed list
            return "text", (), optional
        annotation = args[0] if len(args) == 1 else str
    if get_origin(annotation) is Literal:
        return "choice", tuple(str(c) for c in get_args(annotation)), optional
    if get_origin(annotation) is list:
        item = get_args(annotation)[0]
        if get_origin(item) is Literal:
            return "list", tuple(str(c) for c in get_args(item)), optional
        return "words", (), optional
    kinds: dict[type, Kind] = {bool: "switch", int: "int", float: "float"}
    return kinds.get(annotation, "text"), (), optional


def fields() -> list[Field]:
    """Every config key as a form field, the common ones first."""
    out = []
    for section, model in SECTIONS.items():
        for key, info in model.model_fields.items():
            kind, choices, optional = _kind(info.annotation)
            out.append(Field(f"{section}.{key}", kind, info.default, info.description or "", choices, optional))
    order = {key: i for i, key in enumerate(COMMON)}
    return sorted(out, key=lambda f: order.get(f.key, len(order)))


def preset_values(preset: str | None) -> dict[str, Any]:
    """dotted key -> value of a preset file (or of the defaults), as the form shows them."""
    cfg = load_config(preset) if preset else Config()
    return {
        f"{section}.{key}": getattr(getattr(cfg, section), key)
        for section in SECTIONS
        for key in SECTIONS[section].model_fields
    }


def to_widget(f: Field, value: Any) -> Any:
    """A config value as the form's widget holds it."""
    if f.kind == "switch" and f.optional:
        return AUTO if value is None else str(bool(value)).lower()
    if f.kind == "list":
        return list(value or [])
    if f.kind in ("text", "words") and isinstance(value, list):
        return ", ".join(value)
    if f.kind == "text":
        return "" if value is None else str(value)
    return value


def from_widget(f: Field, value: Any) -> Any:
    """What the widget holds as a config value (blank -> null where the key allows it)."""
    if f.kind == "switch" and f.optional:
        return None if value in (None, AUTO) else value == "true"
    if f.kind == "words":
        return [word.strip() for word in str(value or "").split(",") if word.strip()]
    if f.kind in ("int", "float"):
        if value is None or value == "":
            return None if f.optional else f.default
        return int(value) if f.kind == "int" else float(value)
    if f.kind == "text":
        text = ("" if value is None else str(value)).strip()
        if not text:
            return None if f.optional else f.default
        if f.key == "lora.target_modules" and text != "all-linear":
            return [part.strip() for part in text.split(",") if part.strip()]
        return text
    return value


def _yaml_word(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def overrides(preset: str | None, values: dict[str, Any]) -> dict[str, str]:
    """The form's values that differ from the preset, as `--key value` words; validated (one UserError line)."""
    base = preset_values(preset)
    by_key = {f.key: f for f in fields()}
    changed = {}
    for key, shown in values.items():
        value = from_widget(by_key[key], shown)
        if value != base[key]:
            changed[key] = _yaml_word(value)
    load_config(preset, changed)  # the CLI's own check: a bad value is named here, before any job starts
    return changed


def train_argv(preset: str | None, changed: dict[str, str], resume: bool = False, overwrite: bool = False) -> list[str]:
    """The `qlora train` arguments for a preset and its overrides."""
    argv = ["train"] + (["--config", preset] if preset else [])
    for key, word in changed.items():
        argv += [f"--{key}", word]
    return argv + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])


def command_line(argv: list[str]) -> str:
    return "qlora " + shlex.join(argv)
