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
    assert (a - b).abs().max() < 0.02 * a.abs().max()  # F16 rounding only
    q8 = quantize(tools, f16, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    assert q8.stat().st_size < f16.stat().st_size
    out = run_completion(tools, q8, "Hello", n_predict=8, extra=["--ignore-eos"])
    assert out["tokens"] == 8 and out["tokens_per_s"] > 0  # llama.cpp loaded and ran it


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


# --- llama.cpp driven through its command line: fakes for the plumbing, the real tools when built ----------

FAKE_COMPLETION = r"""
import signal
import sys

signal.alarm(15)   # a parent that never reads stderr would block this fake forever
args = sys.argv[1:]
value = lambda *names: next((args[args.index(n) + 1] for n in names if n in args), None)
if value("-bf", "--binary-file"):
    prompt = open(value("-bf", "--binary-file"), "rb").read().decode()
elif value("-f", "--file"):
    prompt = open(value("-f", "--file")).read().removesuffix("\n")   # llama.cpp drops one trailing newline
else:
    prompt = value("-p", "--prompt")
if "--no-escape" not in args:
    prompt = prompt.replace("\\n", "\n")                             # llama.cpp's default escape processing
sys.stderr.write("load_tensors: a chatty log line\n" * 40000)          # > 1 MB before any output
sys.stderr.flush()
sys.stdout.write(prompt[::-1] + ("\n\n" if "--ignore-eos" in args else " [end of text]\n\n"))
sys.stdout.flush()
sys.stderr.write("common_perf_print:    samplers time = 0.50 ms / 18 tokens\n"
                 "common_perf_print: prompt eval time = 9.00 ms / 14 tokens "
                 "( 0.64 ms per token, 1555.56 tokens per second)\n"
                 "common_perf_print:        eval time = 5.00 ms /     3 runs   "
                 "( 1.67 ms per token, 600.00 tokens per second)\n")
"""


def _fake_tools(tmp_path, **scripts):
    """A LlamaCpp whose binaries and converter scripts are small Python programs."""
    import stat
    import sys

    from qlora_platform.export.llama_cpp import LlamaCpp

    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    for name, body in scripts.items():
        target = tmp_path / ("src" if name.endswith(".py") else "build/bin") / name
        target.write_text(f"#!{sys.executable}\n{body}")
        target.chmod(target.stat().st_mode | stat.S_IEXEC)
    return LlamaCpp(tmp_path / "src", tmp_path / "build")


def test_the_prompt_goes_through_a_file_verbatim_and_a_chatty_stderr_cannot_block(tmp_path):
    from qlora_platform.export.gguf import stream_completion

    tools = _fake_tools(tmp_path, **{"llama-completion": FAKE_COMPLETION})
    prompt = "<|im_start|>user\nWhat does '\\n'.join do? " + "x" * 300_000 + "<|im_start|>assistant\n"
    stats: dict = {}
    text = "".join(stream_completion(tools, tmp_path / "m.gguf", prompt, stats, n_predict=4))
    assert text == prompt[::-1]  # 300 kB, the backslash and the final newline arrive as written
    assert stats["eos"] and stats["tokens"] == 3 and stats["tokens_per_s"] == 600.0
    text = "".join(stream_completion(tools, tmp_path / "m.gguf", "ab\n", stats, extra=["--ignore-eos"]))
    assert text == "\nba" and not stats["eos"] and stats["tokens"] == 4  # the tool's closing blank line is not text


def test_generated_tokens_are_counted_like_the_hf_path():
    from qlora_platform.export.gguf import parse_generation_stats

    # llama-completion's closing timings (SmolLM2, a 14-token prompt, -n 10): 24 = 14 prompt + 10 sampled.
    log = (
        "0.01.770 I common_perf_print:    samplers time =       4.14 ms /    24 tokens\n"
        "0.01.770 I common_perf_print: prompt eval time =     749.62 ms /    14 tokens (   53.54 ms per token,    "
        "18.68 tokens per second)\n0.01.770 I common_perf_print:        eval time =     574.99 ms /     9 runs   "
        "(   63.89 ms per token,    15.65 tokens per second)\n"
    )
    assert parse_generation_stats(log, eos=False)["tokens"] == 10  # the limit: the 10th is sampled, not evaluated
    assert parse_generation_stats(log, eos=True)["tokens"] == 9  # 9 text tokens, then EOS
    assert parse_generation_stats(log, eos=True, produced_text=False)["tokens"] == 0
    # A one-token prompt is decoded as an 'eval' run: 8 runs, 8 tokens sampled (-n 8, --ignore-eos).
    one = (
        "common_perf_print:    samplers time =       0.62 ms /     9 tokens\n"
        "common_perf_print: prompt eval time =       0.00 ms /     1 tokens (    0.00 ms per token,      inf "
        "tokens per second)\ncommon_perf_print:        eval time =    1950.73 ms /     8 runs   (  243.84 ms per "
        "token,     4.10 tokens per second)\n"
    )
    assert parse_generation_stats(one, eos=False)["tokens"] == 8
    # Without the sampler line (other llama.cpp builds) the runs still give the count.
    assert parse_generation_stats(log.split("\n", 1)[1], eos=False)["tokens"] == 10


def _built_tools():
    """The cached llama.cpp build when there is one (building takes minutes: never here)."""
    version = llama_cpp.PINNED_SDIST.split("==")[1]
    build = llama_cpp._root() / f"build-{version}"
    if not all((build / "bin" / t).is_file() for t in ("llama-completion", "llama-quantize")):
        pytest.skip("llama.cpp is not built; run 'qlora setup llama-cpp'")
    return llama_cpp.ensure_llama_cpp(log=lambda *a: None)


@pytest.mark.slow
def test_gguf_engine_reports_length_when_the_limit_ends_the_answer():
    from qlora_platform.export.gguf import stream_completion
    from qlora_platform.infer.gguf_engine import GgufEngine
    from qlora_platform.infer.sampling import SamplingParams
    from qlora_platform.models.bundled import bundled_gguf_path

    tools = _built_tools()
    try:
        gguf = bundled_gguf_path("smollm2-135m-instruct")
    except UserError:
        pytest.skip("the bundled SmolLM2 package is not installed")
    engine = GgufEngine(str(gguf), lambda: tools, stream_completion)
    prompt = engine.encode_chat([{"role": "user", "content": "Write a long story about a dragon."}])
    text = "".join(engine.stream(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True)))
    assert text and engine.last.completion_tokens == 10 and engine.last.finish_reason == "length"
    assert len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) in (9, 10, 11)  # re-tokenized text


def test_a_failed_conversion_leaves_no_file_under_its_final_name(tmp_path):
    converter = "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF half')\nsys.exit(3)\n"
    tools = _fake_tools(tmp_path, **{"convert_hf_to_gguf.py": converter})
    out = tmp_path / "model-F16.gguf"
    with pytest.raises(UserError, match="convert_hf_to_gguf.py failed"):
        convert_to_f16(tools, tmp_path, out)
    assert not out.exists()


def test_export_names_gguf_files_only_after_they_load_and_answer(tiny_model_dir, tmp_path, monkeypatch):
    from qlora_platform.export import run

    monkeypatch.setattr(run, "ensure_llama_cpp", lambda log: llama_cpp.LlamaCpp(tmp_path, tmp_path))
    monkeypatch.setattr(run, "convert_to_f16", lambda tools, src, out: out.write_bytes(b"GGUF f16") and out)
    monkeypatch.setattr(run, "quantize", lambda tools, f16, out, q: out.write_bytes(b"GGUF " + q.encode()) and out)
    monkeypatch.setattr(
        run, "run_completion", lambda tools, path, prompt, **kw: {"text": "" if "Q8_0" in path.name else "an answer"}
    )
    out = tmp_path / "out"
    with pytest.raises(UserError, match="model-Q8_0.gguf loaded but generated nothing"):
        export_gguf(model=str(tiny_model_dir), quants=["Q4_K_M", "Q8_0"], out=str(out), quality=False, log=print)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing unproven under a final name, no staging left
    monkeypatch.setattr(run, "run_completion", lambda tools, path, prompt, **kw: {"text": "an answer"})
    report = export_gguf(model=str(tiny_model_dir), quants=["Q4_K_M"], out=str(out), quality=False, log=print)
    assert [f["name"] for f in report["files"]] == ["model-F16.gguf", "model-Q4_K_M.gguf"]
    assert (out / "model-Q4_K_M.gguf").read_bytes() == b"GGUF Q4_K_M"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_the_git_fallback_checks_out_the_pinned_commit(tmp_path, monkeypatch):
    import subprocess

    def git(*args, cwd):
        subprocess.run(
            ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True
        )

    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git("init", "-q", cwd=upstream)
    (upstream / "CMakeLists.txt").write_text("# pinned\n")
    (upstream / "convert_hf_to_gguf.py").write_text("")
    git("add", ".", cwd=upstream)
    git("commit", "-qm", "pinned", cwd=upstream)
    pinned = subprocess.run(["git", "rev-parse", "HEAD"], cwd=upstream, capture_output=True, text=True).stdout.strip()
    (upstream / "CMakeLists.txt").write_text("# newer\n")
    git("commit", "-qam", "newer", cwd=upstream)

    real_run = subprocess.run

    def no_pypi(cmd, *a, **kw):  # the sdist route fails, as without PyPI
        if "pip" in [str(c) for c in cmd]:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        return real_run(cmd, *a, **kw)

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llama_cpp.subprocess, "run", no_pypi)
    monkeypatch.setattr(llama_cpp, "GIT_URL", str(upstream))
    monkeypatch.setattr(llama_cpp, "LLAMA_CPP_COMMIT", pinned, raising=False)
    source = llama_cpp.obtain_source(log=lambda *a: None)
    assert (source / "CMakeLists.txt").read_text() == "# pinned\n"
    assert real_run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True).stdout.strip() == pinned
    assert llama_cpp.obtain_source(log=lambda *a: None) == source  # reused, as it is at the pinned commit
    monkeypatch.setattr(llama_cpp, "LLAMA_CPP_COMMIT", "0" * 40)
    with pytest.raises(UserError, match="cannot obtain llama.cpp: .*git did too"):
        llama_cpp.obtain_source(log=lambda *a: None)
