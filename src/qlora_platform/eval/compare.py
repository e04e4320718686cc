"""`qlora compare RUN_DIR...`: one table across training runs, in markdown and JSON, and the
keyword benchmark prompt by prompt (base against each run's tuned answer).

    qlora compare runs/mistral-r8 runs/mistral-r16 runs/phi3 [--out comparison]

Each run folder holds what `qlora train` and `qlora eval` wrote: `config.yaml`,
`train_summary.json` and `eval/eval.json` (or an `eval.json` in the folder given).
Missing pieces show as "-" rather than failing, so a run that was trained but not
yet evaluated still has its row; a folder with none of them is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import UserError

COLUMNS = [
    ("run", "run"),
    ("model", "model"),
    ("r", "lora_r"),
    ("alpha", "lora_alpha"),
    ("lr", "learning_rate"),
    ("seq", "max_seq_len"),
    ("batch x accum", "batch"),
    ("steps", "steps"),
    ("ppl base", "perplexity_base"),
    ("ppl tuned", "perplexity_tuned"),
    ("pass base", "pass_rate_base"),
    ("pass tuned", "pass_rate_tuned"),
    ("decode tok/s", "tokens_per_s"),
    ("train tok/s", "train_tokens_per_s"),
    ("train peak GiB", "train_peak_memory_gib"),
    ("train time s", "train_seconds"),
]


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"'{path}' is not valid JSON ({err.msg}); re-run the step that wrote it") from None


def _find_eval(run: Path) -> dict | None:
    for candidate in (run / "eval" / "eval.json", run / "eval.json"):
        found = _json(candidate)
        if found is not None:
            return found
    return None


def run_row(run: Path, ev: dict | None = None) -> dict:
    """`ev`: the run's eval.json when the caller has read it already."""
    if not run.is_dir():
        raise UserError(f"run folder '{run}' does not exist")
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    summary = _json(run / "train_summary.json")
    ev = _find_eval(run) if ev is None else ev
    if cfg is None and summary is None and ev is None:
        raise UserError(
            f"'{run}' has no config.yaml, train_summary.json or eval/eval.json: is it a 'qlora train' output folder?"
        )
    cfg, summary, ev = cfg or {}, summary or {}, ev or {}
    lora, tc, data = cfg.get("lora", {}), cfg.get("training", {}), cfg.get("data", {})
    ppl, rate = ev.get("perplexity", {}), ev.get("keyword_pass_rate") or {}
    batch = f"{tc['batch_size']} x {tc.get('grad_accum', 1)}" if "batch_size" in tc else None
    return {
        "run": str(run),
        "model": cfg.get("model", {}).get("name") or ev.get("model"),
        "lora_r": lora.get("r"),
        "lora_alpha": lora.get("alpha"),
        "learning_rate": tc.get("learning_rate"),
        "max_seq_len": data.get("max_seq_len"),
        "batch": batch,
        "steps": summary.get("steps"),
        "perplexity_base": ppl.get("base"),
        "perplexity_tuned": ppl.get("tuned"),
        "pass_rate_base": rate.get("base"),
        "pass_rate_tuned": rate.get("tuned"),
        "tokens_per_s": ev.get("tokens_per_s"),
        "train_tokens_per_s": summary.get("tokens_per_s"),
        "train_peak_memory_gib": summary.get("peak_memory_gib"),
        "train_seconds": summary.get("train_seconds"),
        "device": summary.get("device") or ev.get("device"),
    }


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key.startswith("pass_rate"):
        return f"{100 * value:.0f}%"
    if key.startswith("perplexity"):
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def to_markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for title, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_fmt(key, row[key]) for _, key in COLUMNS) + " |" for row in rows]
    devices = sorted({row["device"] for row in rows if row.get("device")})
    note = f"\nDevices: {', '.join(devices)}. Compare speeds only between runs on the same device.\n" if devices else ""
    return "\n".join([head, rule, *body]) + "\n" + note


def prompt_rows(runs: list[str], evals_read: list[dict | None]) -> list[dict]:
    """The keyword benchmark prompt by prompt across the runs' evals (`evals_read`, one per run, None
    where a run has none), in the prompt file's order: each run's base and tuned keyword hits and
    verdicts (None where a run's eval lacks the prompt)."""
    names = [Path(r).name or str(r) for r in runs]
    if len(set(names)) < len(names):  # two runs of the same folder name in different places
        names = [str(r) for r in runs]
    evals = {name: ev or {} for name, ev in zip(names, evals_read)}
    order: dict[str, dict] = {}
    for ev in evals.values():
        for row in ev.get("prompts") or []:
            order.setdefault(row["id"], {"id": row["id"], "prompt": row["prompt"], "keywords": len(row["keywords"])})
    out = []
    for pid, head in order.items():
        found = {name: next((r for r in ev.get("prompts") or [] if r["id"] == pid), None) for name, ev in evals.items()}
        out.append(
            {
                **head,
                "needed": next((r["needed"] for r in found.values() if r), None),
                "runs": {
                    name: {side: _verdict(r[side]) for side in ("base", "tuned")} if r else None
                    for name, r in found.items()
                },
            }
        )
    return out


def _verdict(side: dict) -> dict:
    return {"hits": side["hit_count"], "passed": bool(side["passed"])}


def prompts_markdown(rows: list[dict]) -> str:
    """One line per prompt: keywords needed, the base answer's hits (one column when every run's base
    agrees, as it does for one base model answering greedily), each run's tuned hits, and the count
    of runs whose tuned answer passed."""
    if not rows:
        return ""
    names = list(rows[0]["runs"])

    def cell(v: dict | None) -> str:
        return "-" if v is None else f"{v['hits']} {'pass' if v['passed'] else 'fail'}"

    bases = [[cell(r["runs"][n] and r["runs"][n]["base"]) for n in names] for r in rows]
    one_base = all(len({b for b in row if b != "-"}) <= 1 for row in bases)
    shared_base = [next((b for b in base if b != "-"), "-") for base in bases]  # used when one_base
    base_heads = ["base"] if one_base else [f"base {n}" for n in names]
    head = ["prompt", "needed", *base_heads, *names, "tuned passed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, base, shared in zip(rows, bases, shared_base):
        tuned = [row["runs"][n] and row["runs"][n]["tuned"] for n in names]
        ran = [t for t in tuned if t is not None]
        base_cells = [shared] if one_base else base
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{row['id']}`",
                    f"{row['needed']} of {row['keywords']}",
                    *base_cells,
                    *(cell(t) for t in tuned),
                    f"{sum(t['passed'] for t in ran)} of {len(ran)}",
                ]
            )
            + " |"
        )

    def total(side: str, name: str) -> str:
        had = [r["runs"][name] for r in rows if r["runs"][name] is not None]
        return f"{sum(v[side]['passed'] for v in had)}/{len(had)}"

    if one_base:
        base_totals = f"{sum(b.endswith(' pass') for b in shared_base)}/{len(rows)}"
    else:
        base_totals = ", ".join(f"{n} {total('base', n)}" for n in names)
    tuned_totals = ", ".join(f"{n} {total('tuned', n)}" for n in names)
    return (
        "\n".join(lines) + f"\n\nCells: keywords found, pass or fail. Base passes: {base_totals}; "
        f"tuned passes: {tuned_totals}.\n"
    )


def prompts_file(out: str | Path) -> Path:
    """Where `--out NAME` puts the prompt rows: NAME_prompts.json beside NAME.md and NAME.json."""
    base = Path(out).with_suffix("")
    return base.with_name(base.name + "_prompts.json")


def compare_runs(runs: list[str], out: str | None = None) -> tuple[str, list[dict]]:
    if not runs:
        raise UserError("give one or more run folders: qlora compare runs/a runs/b")
    evals = [_find_eval(Path(r)) for r in runs]  # read once: for the table and for the prompt rows
    rows = [run_row(Path(r), ev) for r, ev in zip(runs, evals)]
    prompts = prompt_rows(runs, evals)
    markdown = to_markdown(rows)
    if prompts:
        markdown += "\n## The keyword benchmark, prompt by prompt\n\n" + prompts_markdown(prompts)
    if out:
        base = Path(out)
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".md").write_text("# Run comparison\n\n" + markdown)
        base.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        prompts_file(base).write_text(json.dumps(prompts, indent=2))
    return markdown, rows
