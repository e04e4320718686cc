"""`qlora sweep`: one training run per point of a grid of config values, each evaluated, then one table.

    qlora sweep --config configs/demo.yaml --grid lora.r=8,16,32 \\
        --grid training.learning_rate=1e-4,2e-4,5e-4 [--out runs/sweep] [--training.max_steps 30]

Every point is `qlora train` then `qlora eval` of its adapter, run one after the other as
subprocesses of the same CLI (each point starts with the memory the one before held given
back). A point's folder is `<out>/<label>`, its label made of the grid's values
(`r-8_learning_rate-1e-4`). The sweep is resumable: a point whose training finished and
whose report is newer than its adapter is skipped; one that was stopped continues from its
checkpoint (`--resume`). Every grid key and value is checked against the schema before
anything runs. At the end `<out>/sweep.md` and `sweep.json` hold the `qlora compare` table
of the points with the best one named, and the plots: tuned perplexity and pass rate by
point, the loss curves, training tokens/s and peak memory. With W&B on, the points' runs are
one W&B group (named after the sweep folder).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import load_config, resolve_key
from .errors import UserError
from .eval.compare import run_row, to_markdown
from .eval.plots import write_sweep_plots

FIXED = ("output.dir",)  # the sweep sets these for each point


@dataclass(frozen=True)
class Point:
    label: str
    overrides: dict[str, str]  # dotted key -> the value as typed


def _split_values(text: str) -> list[str]:
    """'8,16,32' -> ['8', '16', '32']; commas inside brackets stay ('[q_proj,v_proj],all-linear')."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    """Each `--grid KEY=V1,V2,...` as (dotted key, values); a bad one is one UserError line."""
    if not grid:
        raise UserError("give at least one --grid KEY=V1,V2 (for example --grid lora.r=8,16,32)")
    axes: list[tuple[str, list[str]]] = []
    for item in grid:
        key, sep, values_text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--grid '{item}': write KEY=V1,V2,... (for example lora.r=8,16,32)")
        try:
            dotted = resolve_key(key.strip())
        except UserError as err:
            raise UserError(f"--grid '{item}': {err}") from None
        if dotted in FIXED:
            raise UserError(f"--grid '{item}': the sweep sets {dotted} for each point; use --out for the sweep folder")
        if any(dotted == known for known, _ in axes):
            raise UserError(f"--grid: {dotted} is given twice; put all its values in one --grid")
        values = _split_values(values_text)
        if any(not v for v in values):
            raise UserError(f"--grid '{item}': an empty value; write KEY=V1,V2,... without empty items")
        if len(set(values)) < len(values):
            raise UserError(f"--grid '{item}': a value is repeated")
        axes.append((dotted, values))
    return axes


def _label(overrides: dict[str, str]) -> str:
    parts = [f"{key.rpartition('.')[2]}-{value.strip('[]{} ')}" for key, value in overrides.items()]
    return re.sub(r"[^\w.+-]+", "_", "_".join(parts)).strip("_")


def grid_points(axes: list[tuple[str, list[str]]]) -> list[Point]:
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        overrides = {key: value for (key, _), value in zip(axes, combo)}
        points.append(Point(_label(overrides), overrides))
    return points


def check_points(config: str | None, overrides: dict[str, str], points: list[Point]) -> None:
    """Every point's config through the schema, before anything runs (one line naming the point)."""
    for point in points:
        try:
            load_config(config, {**overrides, **point.overrides})
        except UserError as err:
            raise UserError(f"grid point {point.label}: {err}") from None


def point_state(run: Path) -> str:
    """'done' (trained, and evaluated after its adapter), 'trained', 'started' (a run to resume) or 'new'."""
    adapter, summary, report = run / "final_adapter", run / "train_summary.json", run / "eval" / "eval.json"
    if summary.is_file() and (adapter / "adapter_config.json").is_file():
        if report.is_file() and report.stat().st_mtime >= (adapter / "adapter_config.json").stat().st_mtime:
            return "done"
        return "trained"
    return "started" if (run / "config.yaml").is_file() else "new"


@dataclass
class SweepPlan:
    config: str | None
    overrides: dict[str, str]  # applied to every point (the sweep's own --key value options)
    points: list[Point]
    out: Path
    eval_args: list[str]  # passed to each `qlora eval`

    def train_argv(self, point: Point) -> list[str]:
        argv = ["train"] + (["--config", self.config] if self.config else [])
        for key, value in {**self.overrides, **point.overrides}.items():
            argv += [f"--{key}", value]
        argv += ["--output.dir", str(self.out / point.label)]
        return argv + (["--resume"] if point_state(self.out / point.label) == "started" else [])

    def eval_argv(self, point: Point) -> list[str]:
        return ["eval", "--adapter", str(self.out / point.label / "final_adapter"), *self.eval_args]


def _run(program: list[str], argv: list[str], env: dict[str, str], label: str) -> None:
    """One CLI command in the foreground; Ctrl-C reaches it too (training saves its checkpoint first)."""
    print(f"$ qlora {shlex.join(argv)}", flush=True)
    proc = subprocess.Popen([*program, *argv], env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # let it finish saving
        raise UserError(
            f"interrupted at point {label}; run the same qlora sweep again to continue from there", exit_code=130
        ) from None
    if code != 0:
        raise UserError(
            f"point {label}: 'qlora {argv[0]}' exited {code} (its error is above); fix it and run the same "
            f"qlora sweep again: finished points are skipped",
            exit_code=code if 0 < code < 126 else 1,
        )


def run_sweep(plan: SweepPlan, program: list[str] | None = None) -> dict:
    """Train and evaluate every point that is not done, then write the table and plots."""
    program = program or [sys.executable, "-m", "qlora_platform.cli"]
    plan.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", plan.out.name)}
    start = time.time()
    for i, point in enumerate(plan.points, 1):
        state = point_state(plan.out / point.label)
        print(f"\n== point {i}/{len(plan.points)}: {point.label} ({state})", flush=True)
        if state in ("new", "started"):
            _run(program, plan.train_argv(point), env, point.label)
        if state != "done":
            _run(program, plan.eval_argv(point), env, point.label)
    return write_summary(plan, time.time() - start)


def write_summary(plan: SweepPlan, seconds: float) -> dict:
    rows, histories = [], {}
    for point in plan.points:
        run = plan.out / point.label
        row = {"point": point.label, **point.overrides, **run_row(run)}
        rows.append(row)
        log = run / "train_log.jsonl"
        histories[point.label] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    plots = write_sweep_plots(plan.out, rows, histories)
    ranked = [r for r in rows if r.get("perplexity_tuned") is not None]
    best = min(ranked, key=lambda r: r["perplexity_tuned"]) if ranked else None
    summary = {
        "config": plan.config,
        "overrides": plan.overrides,
        "grid": {key: list(dict.fromkeys(p.overrides[key] for p in plan.points)) for key in plan.points[0].overrides},
        "points": rows,
        "best": best["point"] if best else None,
        "plots": plots,
        "seconds": round(seconds, 1),
    }
    (plan.out / "sweep.json").write_text(json.dumps(summary, indent=2))
    table = to_markdown([{**r, "run": r["point"]} for r in rows])
    lines = [
        f"# Sweep: {plan.out.name}",
        "",
        f"Base config `{plan.config or 'the schema defaults'}`"
        + (f" with {' '.join(f'--{k} {v}' for k, v in plan.overrides.items())}" if plan.overrides else "")
        + f"; {len(rows)} points, each `qlora train` then `qlora eval`.",
        "",
        table,
    ]
    if best:
        gain = ""
        if best.get("perplexity_base"):
            gain = f" (base {best['perplexity_base']:.3f})"
        lines += [f"Best by tuned holdout perplexity: **{best['point']}**, {best['perplexity_tuned']:.3f}{gain}.", ""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    (plan.out / "sweep.md").write_text("\n".join(lines))
    print(f"\n{table}")
    if best:
        print(f"best by tuned holdout perplexity: {best['point']} ({best['perplexity_tuned']:.3f})")
    print(f"report: {plan.out / 'sweep.md'} (and sweep.json, {', '.join(plots)})")
    return summary
