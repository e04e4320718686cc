"""GGUF export: a tiny model's round trip through real llama.cpp, and the errors users meet."""
from __future__ import annotations

import json

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.export import llama_cpp
from qlora_platform.export.gguf import check_architecture, convert_to_f16, quantize, run_completion
from qlora_platform.export.run import export_gguf


@pytest.fixture(scope="module")
def tools():
    return llama_cpp.ensure_llama_cpp(log=lambda *a: None)  # built once, then cached outside the repo


@pytest.mark.slow
def test_tiny_model_round_trip_through_gguf(tools, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    f16 = convert_to_f16(tools, tiny_model_dir, tmp_path / "tiny-F16.gguf")
    ids = torch.tensor([[1, 42, 99, 7, 1000, 31]])
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f16.name, dtype=torch.float32)
    with torch.no_grad():
        a, b = original(ids).logits, back(ids).logits
    assert (a - b).abs().max() < 0.02 * a.abs().max()          # F16 rounding only
    q8 = quantize(tools, f16, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    assert q8.stat().st_size < f16.stat().st_size
    out = run_completion(tools, q8, "Hello", n_predict=8, extra=["--ignore-eos"])
    assert out["tokens"] == 8 and out["tokens_per_s"] > 0     # llama.cpp loaded and ran it


def test_unsupported_architecture_and_bad_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(UserError, match="FooForCausalLM is not one this exporter supports"):
        check_architecture(tmp_path)
    with pytest.raises(UserError, match="has no config.json"):
        check_architecture(tmp_path / "nothing")


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(UserError, match="unknown --quant Q9_Z"):
        export_gguf(model=str(tmp_path), quants=["Q9_Z"], out=str(tmp_path / "o"))
    with pytest.raises(UserError, match="either --adapter"):
        export_gguf(out=str(tmp_path / "o"))


def test_llama_cpp_source_and_toolchain_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="is not a llama.cpp checkout"):
        llama_cpp.ensure_llama_cpp(log=lambda *a: None)
    fake = tmp_path / "src"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text("")
    (fake / "CMakeLists.txt").write_text("this is not cmake(\n")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(fake))
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    real_which = llama_cpp.shutil.which
    monkeypatch.setattr(llama_cpp.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="needs cmake and a C\\+\\+ compiler: install them .*apt install cmake"):
        llama_cpp.ensure_llama_cpp(log=lambda *a: None)
    monkeypatch.setattr(llama_cpp.shutil, "which", real_which)
    if real_which("cmake"):
        with pytest.raises(UserError, match="building llama.cpp failed .* full log: .*build.log"):
            llama_cpp.ensure_llama_cpp(log=lambda *a: None)
