"""qlora sweep: the grid checked before anything runs, every point trained and evaluated, re-runs skip done points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qlora_platform.cli import main
from qlora_platform.config import dump_config
from qlora_platform.errors import UserError
from qlora_platform.eval.keywords import DEFAULT_PROMPTS
from qlora_platform.sweep import SweepPlan, check_points, grid_points, parse_grid, point_state, run_sweep
from tests.conftest import tiny_run_config, toy_task


def test_grid_keys_values_and_labels():
    axes = parse_grid(["lr=1e-4,5e-4", "lora.target_modules=[q_proj,v_proj],all-linear"])
    assert axes == [
        ("training.learning_rate", ["1e-4", "5e-4"]),
        ("lora.target_modules", ["[q_proj,v_proj]", "all-linear"]),
    ]
    labels = [p.label for p in grid_points(axes)]
    assert labels == [
        "learning_rate-1e-4_target_modules-q_proj_v_proj",
        "learning_rate-1e-4_target_modules-all-linear",
        "learning_rate-5e-4_target_modules-q_proj_v_proj",
        "learning_rate-5e-4_target_modules-all-linear",
    ]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([], "give at least one --grid"),
        (["lora.r"], "write KEY=V1,V2"),
        (["lora.rr=8"], "unknown config key 'lora.rr' \\(did you mean 'r'\\?\\)"),
        (["output.dir=a,b"], "the sweep sets output.dir"),
        (["lora.r=8", "r=16"], "lora.r is given twice"),
        (["lora.r=8,,16"], "an empty value"),
        (["lora.r=8,8"], "a value is repeated"),
    ],
)
def test_a_bad_grid_is_one_line(grid, message):
    with pytest.raises(UserError, match=message):
        parse_grid(grid)


def test_every_point_is_checked_against_the_schema():
    with pytest.raises(UserError, match=r"^grid point r-0: --lora.r: 'lora.r': Input should be greater"):
        check_points(None, {}, grid_points(parse_grid(["lora.r=8,0"])))


def test_bad_input_stops_before_anything_runs(tmp_path, capsys):
    assert main(["sweep", "--grid", "lora.r=8,0", "--out", str(tmp_path / "s")]) == 2
    assert "error: grid point r-0:" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_sweep_trains_and_evaluates_each_point_then_skips_them(tmp_path, tiny_model_dir):
    train, held = toy_task(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text(
        dump_config(tiny_run_config(tiny_model_dir, train, held, tmp_path / "unused", **{"training.max_steps": 3}))
    )
    bench = json.loads(Path(DEFAULT_PROMPTS).read_text())
    bench["prompts"], bench["generation"]["max_new_tokens"] = bench["prompts"][:2], 8
    prompts = tmp_path / "bench.json"
    prompts.write_text(json.dumps(bench))
    out = tmp_path / "sweep"
    plan = SweepPlan(
        config=str(base),
        overrides={"training.seed": "7"},
        points=grid_points(parse_grid(["lora.r=4,8"])),
        out=out,
        eval_args=["--prompts", str(prompts), "--speed-runs", "1", "--speed-tokens", "4", "--device", "cpu"],
    )
    summary = run_sweep(plan)
    assert [row["point"] for row in summary["points"]] == ["r-4", "r-8"]
    assert [row["lora_r"] for row in summary["points"]] == [4, 8]
    assert all("seed: 7" in (out / label / "config.yaml").read_text() for label in ("r-4", "r-8"))
    for label in ("r-4", "r-8"):
        assert point_state(out / label) == "done"
        assert json.loads((out / label / "train_summary.json").read_text())["steps"] == 3
    assert summary["grid"] == {"lora.r": ["4", "8"]} and summary["best"] in ("r-4", "r-8")
    assert set(summary["plots"]) == {
        "perplexity.png",
        "pass_rate.png",
        "tokens_per_s.png",
        "peak_memory.png",
        "loss.png",
    }
    assert all((out / name).stat().st_size > 1000 for name in summary["plots"])
    page = (out / "sweep.md").read_text()
    assert "| r-4 |" in page and "| r-8 |" in page and "Best by tuned holdout perplexity" in page
    # nothing left to do: a second run calls no command (this program would fail if it were called)
    again = run_sweep(plan, program=[sys.executable, "-c", "raise SystemExit(3)"])
    assert [row["perplexity_tuned"] for row in again["points"]] == [
        row["perplexity_tuned"] for row in summary["points"]
    ]


def test_a_stopped_point_resumes_and_a_failed_one_names_itself(tmp_path):
    plan = SweepPlan(None, {}, grid_points(parse_grid(["lora.r=4"])), tmp_path / "s", [])
    (tmp_path / "s" / "r-4").mkdir(parents=True)
    assert point_state(tmp_path / "s" / "r-4") == "new" and "--resume" not in plan.train_argv(plan.points[0])
    (tmp_path / "s" / "r-4" / "config.yaml").write_text("{}")
    assert plan.train_argv(plan.points[0])[-1] == "--resume"
    with pytest.raises(UserError, match="^point r-4: 'qlora train' exited 3 .* run the same qlora sweep again"):
        run_sweep(plan, program=[sys.executable, "-c", "raise SystemExit(3)"])
