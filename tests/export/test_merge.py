"""Merging: W + scale * B @ A exactly, logits equal to base + adapter, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_platform.errors import UserError
from qlora_platform.export.merge import merge_adapter


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model with random (non-zero) A and B, saved as a run would."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(f"model:\n  name: {tiny_model_dir}\nquantization:\n  load_in_4bit: false\n")
    model.save_pretrained(run / "final_adapter")
    return run / "final_adapter"


def test_merged_weights_are_w_plus_scaled_b_a_and_logits_match(adapter_dir, tiny_model_dir, tmp_path):
    report = merge_adapter(str(adapter_dir), str(tmp_path / "merged"), dtype="fp32", log=lambda *a: None)
    base = load_file(tiny_model_dir / "model.safetensors")
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    scale = 8 / 4
    for layer in (0, 1):
        for module in ("self_attn.q_proj", "mlp.down_proj"):
            key = f"model.layers.{layer}.{module}"
            a = lora[f"base_model.model.{key}.lora_A.weight"]
            b = lora[f"base_model.model.{key}.lora_B.weight"]
            expected = base[f"{key}.weight"] + scale * b @ a
            assert torch.allclose(merged[f"{key}.weight"], expected, atol=1e-6)
            assert not torch.allclose(expected, base[f"{key}.weight"], atol=1e-3)  # the adapter did something
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])
    assert report["max_logit_diff_fp32"] < 1e-4 * max(report["logit_scale"], 1)
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["dtype"] == "fp32" and (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_bf16_merge_loads_back_with_its_chat_template(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merge_adapter(str(adapter_dir), str(tmp_path / "m16"), dtype="bf16", log=lambda *a: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert model.dtype == torch.bfloat16 and "lora" not in " ".join(n for n, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(tmp_path / "m16").chat_template


def test_merge_errors_are_clear(adapter_dir, tmp_path):
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        merge_adapter(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(UserError, match="--dtype must be one of"):
        merge_adapter(str(adapter_dir), str(tmp_path / "out"), dtype="int3")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not an earlier merge"):
        merge_adapter(str(adapter_dir), str(busy))


def test_bf16_rounding_is_judged_against_a_stated_tolerance(adapter_dir, tmp_path):
    from qlora_platform.export.report import render

    lines = []
    report = merge_adapter(str(adapter_dir), str(tmp_path / "m16"), dtype="bf16", log=lines.append)
    verdict = next(line for line in lines if "after rounding to bf16" in line)
    assert "ok, tolerance" in verdict and f"{report['rounding_tolerance']:.3g}" in verdict
    assert report["rounding_ok"] and 0 < report["max_logit_diff_after_bf16"] <= report["rounding_tolerance"]
    assert report["rounding_tolerance"] < 0.1 * report["logit_scale"]  # a bound, not anything goes
    saved = json.loads((tmp_path / "m16" / "merge_report.json").read_text())
    assert saved["rounding_ok"] is True
    md = render({"model": "m", "files": [], "merge": saved})
    assert "ok: tolerance" in md and "after rounding to bf16" in md


def test_rounding_past_the_tolerance_fails_and_saves_nothing(adapter_dir, tmp_path, monkeypatch):
    from qlora_platform.export import merge

    monkeypatch.setitem(merge.ROUNDING_TOLERANCE, "bf16", 1e-9)
    lines = []
    with pytest.raises(UserError, match="after rounding to bf16 differ .* nothing was saved"):
        merge_adapter(str(adapter_dir), str(tmp_path / "m16"), dtype="bf16", log=lines.append)
    assert any("FAILED" in line for line in lines)
    assert not (tmp_path / "m16").exists() and not list(tmp_path.iterdir())


def test_a_new_merge_replaces_an_earlier_one_and_leaves_no_temporary_folder(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    merge_adapter(str(adapter_dir), str(out), dtype="fp32", log=lambda *a: None)
    (out / "stale.bin").write_text("from the earlier merge")
    merge_adapter(str(adapter_dir), str(out), dtype="fp32", log=lambda *a: None)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_export_never_deletes_a_merged_folder_it_did_not_write(adapter_dir, tmp_path, monkeypatch):
    from qlora_platform.export.run import export_gguf

    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "no-llama-cpp"))  # nothing slow runs if the check is missing
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    precious = tmp_path / "out" / "merged" / "notes.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("mine")
    with pytest.raises(UserError, match="exists and is not an earlier merge"):
        export_gguf(adapter=str(adapter_dir), out=str(tmp_path / "out"), quality=False)
    assert precious.read_text() == "mine"
