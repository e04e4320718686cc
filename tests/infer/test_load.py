"""Loading an adapter folder for inference: what a downloaded folder can and cannot decide."""

from __future__ import annotations

import json

import pytest

from qlora_platform.errors import UserError
from qlora_platform.infer.load import load_for_inference, resolve_adapter_dir


@pytest.fixture
def crafted_adapter(tmp_path, tiny_model_dir, tokenizer):
    """An adapter folder whose config.yaml asks for trust_remote_code and whose tokenizer config
    maps AutoTokenizer to Python in the folder that leaves a marker file when it runs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run = tmp_path / "downloaded-run"
    adapter = run / "final_adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    marker = tmp_path / "code-ran"
    (adapter / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    tok_cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (adapter / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (run / "config.yaml").write_text(
        f"model:\n  name: {tiny_model_dir}\n  trust_remote_code: true\n"
        "quantization:\n  compute_dtype: float32\ntraining:\n  device: cpu\n"
    )
    return run, marker


def test_an_adapter_folder_cannot_turn_on_remote_code(crafted_adapter):
    run, marker = crafted_adapter
    said = []
    try:
        loaded = load_for_inference(adapter=str(run / "final_adapter"), log=said.append)
    except UserError:
        loaded = None
    assert not marker.exists(), "the adapter folder's Python ran"
    assert any("trust_remote_code; ignored" in line for line in said), said
    if loaded is not None:
        assert loaded.cfg.model.trust_remote_code is False


def test_a_run_folder_stands_for_its_final_adapter(crafted_adapter, tmp_path):
    run, _ = crafted_adapter
    assert resolve_adapter_dir(run) == run / "final_adapter"
    assert resolve_adapter_dir(run / "final_adapter") == run / "final_adapter"
    assert resolve_adapter_dir(tmp_path / "missing") == tmp_path / "missing"
