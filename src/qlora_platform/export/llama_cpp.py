"""A pinned llama.cpp: where its source comes from, how it is built, where the tools are.

    qlora setup llama-cpp                    # obtain + build once (about 4 minutes on 2 cores)
    tools = ensure_llama_cpp()               # same, from code; returns LlamaCpp paths
    tools.binary("llama-quantize")

Source, in order: `$LLAMA_CPP_DIR` (a user's checkout), else the pinned PyPI sdist of
`llama-cpp-python`, which carries llama.cpp under `vendor/llama.cpp` (downloaded with
pip, unpacked into the cache), else, where the network allows, a shallow git fetch of
exactly the commit that sdist vendors (`LLAMA_CPP_COMMIT`), checked out and verified,
so both routes build the same llama.cpp.
The build goes to `<cache>/llama.cpp/build-<version>` (cache: `$QLORA_CACHE` or
`~/.cache/qlora-platform`), outside any repository, and is reused while its stamp says
the same source and targets. A missing cmake or compiler, or a failed build, is one
`UserError` that names the fix and the log file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..models.bundled import cache_dir

PINNED_SDIST = "llama-cpp-python==0.3.36"
# The llama.cpp commit vendored by that sdist (its .git/modules/vendor/llama.cpp/HEAD; CHANGELOG 0.3.36:
# "update llama.cpp to ggml-org/llama.cpp@0c1e57098"). Change both together.
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# The tools the platform runs: quantize (export), perplexity and bench (the export's quality table),
# completion (generation from a GGUF). llama-cli and llama-server are not built: nothing here runs
# them, and leaving them out shortens the one-time build on a small CPU.
TARGETS = ["llama-quantize", "llama-perplexity", "llama-completion", "llama-bench"]
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]
GIT_URL = "https://github.com/ggml-org/llama.cpp"


@dataclass
class LlamaCpp:
    source: Path
    build: Path

    def binary(self, name: str) -> Path:
        path = self.build / "bin" / name
        if not path.is_file():
            raise UserError(f"llama.cpp tool '{name}' is missing from {path.parent}; run 'qlora setup llama-cpp'")
        return path

    def script(self, name: str) -> Path:
        return self.source / name

    def python_env(self) -> dict:
        """The converters need llama.cpp's own gguf-py, matching their version, first on the path."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.source / "gguf-py"), env.get("PYTHONPATH")]))
        return env


def _root() -> Path:
    return cache_dir().parent / "llama.cpp" if cache_dir().name == "models" else cache_dir() / "llama.cpp"


def _valid_source(path: Path) -> bool:
    return (path / "CMakeLists.txt").is_file() and (path / "convert_hf_to_gguf.py").is_file()


def obtain_source(log=print) -> Path:
    custom = os.environ.get("LLAMA_CPP_DIR")
    if custom:
        path = Path(custom).expanduser()
        if not _valid_source(path):
            raise UserError(
                f"LLAMA_CPP_DIR='{custom}' is not a llama.cpp checkout (no CMakeLists.txt and "
                f"convert_hf_to_gguf.py); unset it to use the pinned copy"
            )
        return path
    version = PINNED_SDIST.split("==")[1]
    unpacked = _root() / f"src-{version}"
    vendored = unpacked / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if _valid_source(vendored):
        return vendored
    unpacked.mkdir(parents=True, exist_ok=True)
    log(f"llama.cpp: downloading the pinned source ({PINNED_SDIST} sdist from PyPI, ~77 MB)")
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            PINNED_SDIST,
            "-d",
            str(unpacked),
        ],
        capture_output=True,
        text=True,
    )
    archives = sorted(unpacked.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode == 0 and archives:
        with tarfile.open(archives[0]) as tar:
            members = [
                m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name or m.name.endswith("vendor/llama.cpp")
            ]
            tar.extractall(unpacked, members=members, filter="data")
        archives[0].unlink()
        if _valid_source(vendored):
            return vendored
    git_said = ""
    if shutil.which("git"):
        clone = _root() / f"src-git-{LLAMA_CPP_COMMIT[:12]}"
        if _valid_source(clone) and _checked_out(clone) == LLAMA_CPP_COMMIT:
            return clone
        log(f"llama.cpp: PyPI download failed; fetching commit {LLAMA_CPP_COMMIT[:12]} with git")
        git_said = _git_fetch_commit(GIT_URL, LLAMA_CPP_COMMIT, clone)
        if not git_said:
            return clone
    said = [ln.strip() for ln in (got.stderr or got.stdout).splitlines() if "error" in ln.lower()][:2]
    raise UserError(
        f"cannot obtain llama.cpp: 'pip download {PINNED_SDIST}' failed ({' / '.join(said) or 'no output'}) "
        f"and git did too ({git_said or 'git is not installed'}); connect to PyPI or GitHub, or set "
        f"LLAMA_CPP_DIR to a llama.cpp checkout"
    )


def _checked_out(repo: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _git_fetch_commit(url: str, commit: str, dest: Path) -> str:
    """Check out exactly `commit` of `url` into `dest` (only that commit is fetched); '' when done, else
    what went wrong. `dest` is this cache's own folder for that commit, so a failed try is redone afresh."""
    if dest.exists():
        if not (dest / ".git").is_dir():
            return f"'{dest}' exists and is not a git checkout; remove it"
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    steps = [
        ["git", "init", "-q"],
        ["git", "remote", "add", "origin", url],
        ["git", "fetch", "-q", "--depth", "1", "origin", commit],
        ["git", "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
        if done.returncode != 0:
            tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
            return f"'{' '.join(cmd[:3])}' failed: {tail or 'no output'}"
    head = _checked_out(dest)
    if head != commit:
        return f"checked out {head}, not the pinned {commit}"
    if not _valid_source(dest):
        return f"commit {commit[:12]} has no CMakeLists.txt and convert_hf_to_gguf.py"
    return ""


def _check_toolchain() -> None:
    missing = [tool for tool in ("cmake",) if not shutil.which(tool)]
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    if missing:
        raise UserError(
            f"building llama.cpp needs {' and '.join(missing)}: install them (Debian/Ubuntu: "
            f"'sudo apt install cmake build-essential'; macOS: 'xcode-select --install && brew "
            f"install cmake') and re-run 'qlora setup llama-cpp'"
        )


def _stamp(source: Path) -> dict:
    return {"source": str(source.resolve()), "targets": TARGETS, "flags": CMAKE_FLAGS}


def ensure_llama_cpp(log=print, force: bool = False) -> LlamaCpp:
    """The built tools, building them first when the cache has none for this source."""
    source = obtain_source(log)
    tag = "custom" if os.environ.get("LLAMA_CPP_DIR") else PINNED_SDIST.split("==")[1]
    build = _root() / f"build-{tag}"
    stamp_file = build / "qlora_build.json"
    if not force and stamp_file.is_file() and json.loads(stamp_file.read_text()) == _stamp(source):
        tools = LlamaCpp(source, build)
        if all((build / "bin" / t).is_file() for t in TARGETS):
            return tools
    _check_toolchain()
    build.mkdir(parents=True, exist_ok=True)
    log_file = build / "build.log"
    jobs = str(os.cpu_count() or 2)
    log(f"llama.cpp: building {', '.join(TARGETS)} in {build} (about 4 minutes on 2 cores; once)")
    with log_file.open("w") as fh:
        steps = [
            ["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS],
            ["cmake", "--build", str(build), "--config", "Release", "-j", jobs, "--target", *TARGETS],
        ]
        for cmd in steps:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
                raise UserError(
                    f"building llama.cpp failed at '{' '.join(cmd[:3])}'; full log: {log_file}. "
                    f"Last lines: {' / '.join(tail)}"
                )
    stamp_file.write_text(json.dumps(_stamp(source)))
    return LlamaCpp(source, build)
