import json

import pytest

from qlora_platform.errors import UserError
from qlora_platform.models.loader import hub_error, resolve_model_source


def test_bundled_conversion_is_a_loadable_folder_with_the_right_eos(bundled_dir, tokenizer):
    config = json.loads((bundled_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (bundled_dir / "model.safetensors").is_file()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    assert tokenizer.chat_template


@pytest.mark.parametrize(
    "name,message",
    [
        ("./no/such/model", "model path './no/such/model' does not exist"),
        ("/tmp/definitely-missing.gguf", "GGUF file '/tmp/definitely-missing.gguf' does not exist"),
        ("bundled:gpt-7", "unknown bundled model 'gpt-7'"),
    ],
)
def test_bad_model_names(name, message):
    with pytest.raises(UserError, match=message):
        resolve_model_source(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_source(str(tmp_path))


def test_hub_ids_pass_through():
    assert resolve_model_source("mistralai/Mistral-7B-Instruct-v0.3") == "mistralai/Mistral-7B-Instruct-v0.3"


@pytest.mark.parametrize(
    "err,message",
    [
        (OSError("401 Client Error: Unauthorized ... gated repo"), "HF_TOKEN"),
        (OSError("RepositoryNotFoundError: 404"), "was not found"),
        (OSError("We couldn't connect to 'https://huggingface.co' ... offline mode"), "cannot reach the hub"),
    ],
)
def test_hub_errors_become_one_actionable_line(err, message):
    assert message in str(hub_error("meta-llama/Meta-Llama-3-8B-Instruct", err))


def test_an_unreachable_hub_switches_to_offline_at_once(monkeypatch):
    """Without a network, hub ids resolve in offline mode instead of retrying for tens of seconds."""
    from huggingface_hub import constants

    from qlora_platform.models import loader

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loader, "hub_reachable", lambda timeout=2.0: False)
    assert loader.resolve_model_source("someone/some-model") == "someone/some-model"
    assert constants.HF_HUB_OFFLINE is True


def test_library_noise_is_filtered(caplog):
    import logging

    from qlora_platform.cli import quiet_library_noise

    quiet_library_noise()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_bpe_tokenizers_decode_without_the_clean_up_warning(tiny_model_dir, capsys, caplog):
    import logging

    from qlora_platform.config import ModelConfig
    from qlora_platform.models.loader import load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    assert tok.clean_up_tokenization_spaces is False
    with caplog.at_level(logging.WARNING):
        text = tok.decode(tok("Hello , world !")["input_ids"], skip_special_tokens=True)
    assert text == "Hello , world !"
    assert "clean_up_tokenization_spaces" not in caplog.text + capsys.readouterr().err


def test_the_noise_filter_is_installed_once():
    import logging

    from qlora_platform.cli import quiet_library_noise

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    quiet_library_noise()
    before = len(logger.filters)
    quiet_library_noise()
    assert len(logger.filters) == before
