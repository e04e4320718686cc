"""The package's import boundaries: no import cycle, and every import points down the layers.

    errors <- config <- data <- models / rag <- infer <- train / eval / export <- demo / doctor / ui / sweep <- cli

Units of one layer do not import each other (train, eval and export are siblings; so are
data and kernels); kernels import nothing else of the package, and anything above data may
use them. Evaluation and export generate text, so infer sits below them. Every import
counts, including those inside functions (a lazy import is still a dependency); only
imports under `if TYPE_CHECKING:` are left out. The checker reads the source with `ast`
and never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "qlora_platform"
SRC = Path(__file__).resolve().parents[1] / "src"

# unit (sub-package or top-level module) -> layer; a unit may import lower layers only.
LAYERS = {
    "__init__": 0,
    "errors": 0,
    "config": 1,
    "data": 2,
    "kernels": 2,
    "models": 3,
    "rag": 3,
    "infer": 4,
    "train": 5,
    "eval": 5,
    "export": 5,
    "demo": 6,
    "doctor": 6,
    "ui": 6,
    "sweep": 6,
    "cli": 7,
}
ISOLATED = {"kernels"}  # import nothing else of the package


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `src`."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, (ast.Name, ast.Attribute))
        and (getattr(test, "id", None) or getattr(test, "attr", None)) == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (a package import means its __init__)."""
    modules = module_files(src, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        targets = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                names: list[str] = []
            else:
                if node.level:
                    anchor = here[: len(here) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                bases, names = [base], [alias.name for alias in node.names]
            for base in bases:
                if base != package and not base.startswith(package + "."):
                    continue
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
                if len(subs) < len(names) or not names:
                    while base not in modules and "." in base:
                        base = base.rsplit(".", 1)[0]
                    subs.append(base)
                targets.update(s for s in subs if s != name)
        graph[name] = targets
    return graph


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS, isolated: set[str] = ISOLATED) -> list[str]:
    """Every problem, one line each: module cycles, package cycles, imports that do not point down."""
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(module))
    problems += [f"package cycle: {' <-> '.join(c)}" for c in cycles(units)]
    for module, targets in sorted(graph.items()):
        here = unit_of(module)
        if here not in layers:
            problems.append(f"{module}: unit '{here}' has no layer in the contract")
            continue
        for target in sorted(targets):
            there = unit_of(target)
            if there == here:
                continue
            if here in isolated:
                problems.append(f"{module} imports {target}: {here} imports nothing else of the package")
            elif there not in layers or (layers[there] >= layers[here] and there not in isolated):
                problems.append(f"{module} imports {target}: {here} may not import {there}")
            elif there in isolated and layers[here] <= layers[there]:
                problems.append(f"{module} imports {target}: {here} is below {there}")
    return problems


def test_the_package_keeps_its_layers_and_has_no_import_cycle():
    graph = import_graph(SRC, PACKAGE)
    assert "qlora_platform.train.trainer" in graph and graph["qlora_platform.train.trainer"]
    assert violations(graph) == []


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root / "pkg", *[p for p in (root / "pkg").rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return root


FAKE_LAYERS = {"__init__": 0, "data": 1, "kernels": 1, "models": 2, "train": 3, "eval": 3, "cli": 4}


def test_the_checker_passes_a_clean_fake_package(tmp_path):
    src = _fake_package(
        tmp_path,
        {
            "data/a.py": "import json\n",
            "models/m.py": "from ..data import a\nfrom ..kernels.k import f\n",
            "kernels/k.py": "def f():\n    pass\n",
            "train/t.py": "from ..models.m import x\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from ..eval.e import y\n",
            "eval/e.py": "from pkg.models import m\n",
            "cli.py": "def main():\n    from .train.t import run\n    from .eval import e\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert graph["pkg.cli"] == {"pkg.train.t", "pkg.eval.e"}
    assert graph["pkg.train.t"] == {"pkg.models.m"}  # TYPE_CHECKING imports do not count
    assert violations(graph, FAKE_LAYERS, {"kernels"}) == []


def test_the_checker_catches_a_planted_cycle_and_crossed_layers(tmp_path):
    src = _fake_package(
        tmp_path,
        {
            "data/a.py": "from . import b\n",
            "data/b.py": "def g():\n    from .a import x   # lazy, still a cycle\n",
            "models/m.py": "from ..data import a\n",
            "kernels/k.py": "from ..data.a import z\n",
            "train/t.py": "from ..eval.e import y\n",
            "eval/e.py": "from ..train import t\n",
            "cli.py": "",
        },
    )
    problems = violations(import_graph(src, "pkg"), FAKE_LAYERS, {"kernels"})
    assert "import cycle: pkg.data.a <-> pkg.data.b" in problems
    assert "import cycle: pkg.eval.e <-> pkg.train.t" in problems
    assert "package cycle: eval <-> train" in problems
    assert "pkg.train.t imports pkg.eval.e: train may not import eval" in problems
    assert "pkg.kernels.k imports pkg.data.a: kernels imports nothing else of the package" in problems
    assert not any(p.startswith("pkg.models.m") for p in problems)


def test_the_checker_catches_an_upward_import(tmp_path):
    src = _fake_package(tmp_path, {"data/a.py": "from ..models.m import x\n", "models/m.py": "", "cli.py": ""})
    assert violations(import_graph(src, "pkg"), FAKE_LAYERS, {"kernels"}) == [
        "pkg.data.a imports pkg.models.m: data may not import models"
    ]


def test_tests_import_the_package_not_the_benchmarks():
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        rel = path.relative_to(tests).as_posix()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "benchmarks" or n.startswith("benchmarks.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == [], f"tests import benchmarks/ (move what they need into the package): {offenders}"
