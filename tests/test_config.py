from pathlib import Path

import pytest

from qlora_platform.config import Config, load_config
from qlora_platform.errors import UserError

PRESETS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    assert isinstance(load_config(preset), Config)


def test_mistral_preset_matches_the_plan():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/mistral-7b.yaml")
    assert cfg.model.name == "mistralai/Mistral-7B-Instruct-v0.3"
    assert (cfg.training.batch_size, cfg.data.max_seq_len, cfg.lora.r, cfg.lora.alpha) == (2, 1024, 16, 32)
    assert (cfg.training.learning_rate, cfg.training.epochs) == (2e-4, 3)
    assert cfg.training.optimizer == "paged_adamw_8bit" and cfg.training.gradient_checkpointing


def test_overrides_dotted_and_bare_keys_with_yaml_values():
    cfg = load_config(None, {"training.learning_rate": "1e-4", "packing": "true", "r": "8",
                             "target_modules": "[q_proj, v_proj]"})
    assert cfg.training.learning_rate == 1e-4
    assert cfg.data.packing is True and cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_in_yaml_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rat: 0.001\n")
    with pytest.raises(UserError, match=r"unknown config key 'training.learning_rat'.*did you mean 'learning_rate'"):
        load_config(path)


def test_unknown_override_key_suggests():
    with pytest.raises(UserError, match="did you mean 'batch_size'"):
        load_config(None, {"batch_sise": "2"})


def test_unknown_section():
    with pytest.raises(UserError, match="unknown config section 'trainig'.*did you mean 'training'"):
        load_config(None, {"trainig.epochs": "2"})


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: two\n")
    with pytest.raises(UserError, match=r"'training.batch_size'.*got 'two'"):
        load_config(path)


@pytest.mark.parametrize("key,value", [("training.learning_rate", "-1"), ("lora.dropout", "1.5"),
                                       ("lora.r", "0"), ("training.optimizer", "sgd")])
def test_impossible_values(key, value):
    with pytest.raises(UserError, match=key):
        load_config(None, {key: value})


def test_8bit_optimizer_on_cpu_is_refused():
    with pytest.raises(UserError, match="8-bit optimizers need a GPU"):
        load_config(None, {"optimizer": "paged_adamw_8bit", "device": "cpu"})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(top)
