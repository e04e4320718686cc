"""The Train form from the config schema, and the `qlora train` command line it stands for."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_platform.config import SECTIONS
from qlora_platform.errors import UserError
from qlora_platform.ui.forms import AUTO, COMMON, command_line, fields, overrides, preset_values, to_widget, train_argv

PRESET = "model:\n  name: bundled:smollm2-135m-instruct\ntraining:\n  max_steps: 6\noutput:\n  dir: runs/x\n"


@pytest.fixture
def preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(PRESET)
    return "p.yaml"


def test_every_schema_key_once_common_first():
    keys = [f.key for f in fields()]
    schema = [f"{s}.{k}" for s, m in SECTIONS.items() for k in m.model_fields]
    assert sorted(keys) == sorted(schema)
    assert keys[: len(COMMON)] == list(COMMON)
    by_key = {f.key: f for f in fields()}
    assert by_key["training.method"].kind == "choice" and "dpo" in by_key["training.method"].choices
    assert by_key["quantization.fp32_norms"].kind == "switch" and by_key["quantization.fp32_norms"].optional
    assert by_key["training.max_steps"].kind == "int" and by_key["training.max_steps"].optional
    assert by_key["training.learning_rate"].kind == "float"
    report_to = by_key["training.report_to"]
    assert report_to.kind == "list" and report_to.choices == ("tensorboard", "wandb")
    assert by_key["lora.target_modules"].kind == "text"
    assert by_key["lora.r"].help == "LoRA rank"


def form(preset_path):
    values = preset_values(preset_path)
    return {f.key: to_widget(f, values[f.key]) for f in fields()}


def test_an_untouched_form_is_the_preset(preset):
    shown = form(preset)
    assert shown["quantization.fp32_norms"] == AUTO and shown["training.max_steps"] == 6
    assert overrides(preset, shown) == {}
    assert command_line(train_argv(preset, {})) == "qlora train --config p.yaml"


def test_changed_keys_become_overrides(preset):
    shown = form(preset)
    shown |= {
        "training.learning_rate": 3e-4,
        "quantization.fp32_norms": "false",
        "lora.target_modules": "q_proj, v_proj",
        "training.max_steps": None,  # blank: back to epochs
        "training.report_to": [],
    }
    changed = overrides(preset, shown)
    assert changed == {
        "training.learning_rate": "0.0003",
        "quantization.fp32_norms": "false",
        "lora.target_modules": "[q_proj, v_proj]",
        "training.max_steps": "null",
        "training.report_to": "[]",
    }
    argv = train_argv(preset, changed, resume=True)
    assert argv[:3] == ["train", "--config", "p.yaml"] and argv[-1] == "--resume"
    assert command_line(argv) == (  # in the form's order, quoted for a shell
        "qlora train --config p.yaml --training.max_steps null --training.learning_rate 0.0003 "
        "--quantization.fp32_norms false --lora.target_modules '[q_proj, v_proj]' --training.report_to '[]' --resume"
    )


def test_a_bad_value_is_named_before_anything_runs(preset):
    shown = form(preset) | {"training.learning_rate": 5.0}
    with pytest.raises(UserError, match=r"--training.learning_rate: 'training.learning_rate'"):
        overrides(preset, shown)


@pytest.mark.parametrize("preset", sorted(str(p) for p in (Path(__file__).parents[2] / "configs").glob("*.yaml")))
def test_every_shipped_preset_fills_the_form_and_means_itself(preset):
    """Each widget value is one its widget accepts (a check-box list only holds its choices), and the
    untouched form gives the preset back: no override at all."""
    values = preset_values(preset)
    shown = {f.key: to_widget(f, values[f.key]) for f in fields()}
    for f in fields():
        if f.kind == "list":
            assert set(shown[f.key]) <= set(f.choices), f.key
        if f.kind == "choice" or (f.kind == "switch" and f.optional):
            assert shown[f.key] in (*f.choices, AUTO, "true", "false"), f.key
    assert overrides(preset, shown) == {}


def test_a_free_list_is_typed_comma_separated(preset):
    shown = form(preset) | {"alignment.reward_functions": "a.py:f, pkg.mod:g"}
    assert overrides(preset, shown) == {"alignment.reward_functions": "[a.py:f, pkg.mod:g]"}
