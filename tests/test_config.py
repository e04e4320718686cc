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
    cfg = load_config(
        None, {"training.learning_rate": "1e-4", "packing": "true", "r": "8", "target_modules": "[q_proj, v_proj]"}
    )
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


@pytest.mark.parametrize(
    "key,value",
    [("training.learning_rate", "-1"), ("lora.dropout", "1.5"), ("lora.r", "0"), ("training.optimizer", "sgd")],
)
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


def test_resolve_decides_every_device_dependent_default():
    import dataclasses

    from qlora_platform.config import resolve

    cpu, gpu = resolve(Config(), "cpu"), resolve(Config(), "cuda")
    assert (cpu.optimizer, cpu.fast_kernels, cpu.fp32_norms, cpu.offload_checkpoints, cpu.fp8) == (
        "adamw",
        False,
        True,
        False,
        False,
    )
    assert (gpu.optimizer, gpu.fast_kernels, gpu.fp32_norms, gpu.offload_checkpoints, gpu.fp8) == (
        "paged_adamw_8bit",
        True,
        False,
        True,
        False,
    )
    cfg = load_config(
        None,
        {
            "fast_kernels": "true",
            "fp8": "true",
            "fp32_norms": "false",
            "optimizer": "adamw",
            "gradient_checkpointing": "false",
        },
    )
    explicit = resolve(cfg, "cpu")
    assert (explicit.optimizer, explicit.fast_kernels, explicit.fp8, explicit.fp32_norms) == (
        "adamw",
        True,
        True,
        False,
    )
    assert not resolve(cfg, "cuda").offload_checkpoints  # nothing to offload without checkpointing
    assert not resolve(load_config(None, {"fp8": "true", "fast_kernels": "false"}), "cuda").fp8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.fast_kernels = True
    with pytest.raises(ValueError, match="picked device"):
        resolve(Config(), "auto")


def test_resume_keys_are_declared_on_the_schema():
    from qlora_platform.config import resume_keys

    assert set(resume_keys()) == {
        ("training", "method"),
        ("training", "batch_size"),
        ("training", "grad_accum"),
        ("training", "seed"),
        ("data", "max_seq_len"),
        ("data", "packing"),
        ("data", "train_file"),
        ("lora", "r"),
        ("lora", "target_modules"),
        ("model", "name"),
        ("training", "fast_kernels"),
    }


def test_every_key_has_a_description_and_help_config_shows_it():
    from qlora_platform.config import SECTIONS, describe_keys

    text = describe_keys()
    for section, model in SECTIONS.items():
        for key, field in model.model_fields.items():
            assert field.description, f"{section}.{key} has no description"
            assert field.description in text
    assert "seed: 42  (must match on --resume)" in text


def test_docs_config_md_matches_the_schema():
    from qlora_platform.config import with_config_reference

    page = Path(__file__).resolve().parents[1] / "docs/config.md"
    text = page.read_text(encoding="utf-8")
    assert text == with_config_reference(text), (
        "docs/config.md is stale: run 'python -m qlora_platform.config docs/config.md'"
    )
    assert "| `training.learning_rate` | `0.0002` |" in text


def test_a_stale_reference_is_detected():
    from qlora_platform.config import DOC_BEGIN, DOC_END, with_config_reference

    stale = f"# Config\n\n{DOC_BEGIN}\n| `training.lr` | old |\n{DOC_END}\n"
    fresh = with_config_reference(stale)
    assert fresh != stale and fresh.startswith("# Config\n") and fresh.endswith(f"{DOC_END}\n")
    assert with_config_reference(fresh) == fresh
    with pytest.raises(ValueError, match="no generated section"):
        with_config_reference("# no markers\n")


def test_a_flat_yaml_config_reads_like_the_command_line(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text(
        "model: mistralai/Mistral-7B-Instruct-v0.3\nlearning_rate: 1.0e-4\nnum_epochs: 2\n"
        "micro_batch_size: 2\nlora_r: 8\nsequence_len: 512\npacking: true\noutput_dir: runs/x\n"
        "training:\n  seed: 7\n"
    )
    cfg = load_config(path)
    assert cfg.model.name == "mistralai/Mistral-7B-Instruct-v0.3"
    assert (cfg.training.learning_rate, cfg.training.epochs, cfg.training.batch_size, cfg.training.seed) == (
        1e-4,
        2,
        2,
        7,
    )
    assert (cfg.lora.r, cfg.data.max_seq_len, cfg.data.packing, cfg.output.dir) == (8, 512, True, "runs/x")
    # The command line still wins over the file.
    assert load_config(path, {"lr": "3e-4"}).training.learning_rate == 3e-4


def test_a_flat_yaml_config_fails_in_one_line_like_the_command_line(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("model: x\nlearnin_rate: 1.0e-4\n")
    with pytest.raises(
        UserError,
        match=r"flat.yaml: unknown config key 'learnin_rate' \(did you mean "
        r"'learning_rate'\?\)",
    ) as err:
        load_config(path)
    assert "\n" not in str(err.value)
    path.write_text("lr: 1.0e-4\ntraining:\n  learning_rate: 2.0e-4\n")
    with pytest.raises(UserError, match="'training.learning_rate' is set twice"):
        load_config(path)
    path.write_text("dropout: 0.1\n")
    assert load_config(path).lora.dropout == 0.1
    path.write_text("lr: 3\n")
    with pytest.raises(UserError, match="flat.yaml: 'training.learning_rate': Input should be less than 1"):
        load_config(path)


def test_a_config_that_is_not_utf8_fails_in_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model:\n  name: \xff\xfe\x00binary\n")
    with pytest.raises(
        UserError, match=r"c.yaml:2: not UTF-8 text \(byte 0xff at column 9\); a config is a UTF-8 YAML file$"
    ):
        load_config(path)
