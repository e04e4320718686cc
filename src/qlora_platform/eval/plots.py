"""PNG plots of an evaluation: the run's loss curves, perplexity and keyword pass rate, base vs tuned.

    paths = write_plots(out_dir, history, report)   # ["loss.png", "perplexity.png", ...]

Matplotlib with the Agg backend (files only, no display). `history` is the run's
`train_log.jsonl` (a resumed run cuts its log back to the resumed step; where a step still
appears twice, as in logs of older runs, the last record wins).
"""

from __future__ import annotations

from pathlib import Path

BASE_COLOUR, TUNED_COLOUR = "#8a8a8a", "#1f77b4"


def _last_per_step(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = {rec["step"]: rec[key] for rec in history if key in rec and "step" in rec}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _bars(path: Path, title: str, ylabel: str, base: float, tuned: float, fmt: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.6), dpi=110)
    bars = ax.bar(["base", "tuned"], [base, tuned], color=[BASE_COLOUR, TUNED_COLOUR], width=0.55)
    for bar, value in zip(bars, [base, tuned]):
        ax.annotate(
            fmt.format(value),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=10,
        )
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(base, tuned) * 1.18 or 1)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(out: Path, history: list[dict], report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    steps, loss = _last_per_step(history, "loss")
    eval_steps, eval_loss = _last_per_step(history, "eval_loss")
    base_loss = report["perplexity"]["base_loss"]
    if steps:
        fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
        ax.plot(steps, loss, color=TUNED_COLOUR, label="training loss (answer tokens)")
        ax.plot(
            [0] + eval_steps,
            [base_loss] + eval_loss,
            "o--",
            color="#d62728",
            label="holdout loss (step 0 = base model)",
        )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean cross-entropy (nats/token)")
        ax.set_title("Training and holdout loss", fontsize=11)
        ax.legend(frameon=False)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png")
        plt.close(fig)
        written.append("loss.png")
    ppl = report["perplexity"]
    _bars(
        out / "perplexity.png",
        f"Holdout perplexity ({ppl['tokens']} answer tokens, lower is better)",
        "perplexity",
        ppl["base"],
        ppl["tuned"],
        "{:.2f}",
    )
    written.append("perplexity.png")
    rate = report["keyword_pass_rate"]
    if not rate:  # the keyword benchmark did not run (a tool-use holdout)
        return written
    _bars(
        out / "keywords.png",
        f"Keyword benchmark pass rate ({report['keyword_benchmark']['prompts']} prompts)",
        "pass rate (%)",
        100 * rate["base"],
        100 * rate["tuned"],
        "{:.0f}%",
    )
    written.append("keywords.png")
    return written


def write_sweep_plots(out: Path, rows: list[dict], histories: dict[str, list[dict]]) -> list[str]:
    """A sweep's plots: tuned perplexity and pass rate by point, the points' loss curves, their speed and memory.

    `rows` are `compare.run_row` rows with a `point` label each; `histories` maps a label to its
    run's train_log.jsonl records. A chart whose numbers no point has is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["point"] for row in rows]
    written = []

    def bars(name: str, title: str, ylabel: str, key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> None:
        values = [row.get(key) for row in rows]
        if all(v is None for v in values):
            return
        fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(rows) + 1.5), 3.8), dpi=110)
        shown = [scale * v if v is not None else 0.0 for v in values]
        drawn = ax.bar(range(len(rows)), shown, color=TUNED_COLOUR, width=0.6)
        for bar, value in zip(drawn, values):
            text = "-" if value is None else fmt.format(scale * value)
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(shown) * 1.18 or 1)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)

    bars("perplexity.png", "Tuned holdout perplexity (lower is better)", "perplexity", "perplexity_tuned")
    bars("pass_rate.png", "Tuned keyword pass rate", "pass rate (%)", "pass_rate_tuned", 100.0, "{:.0f}%")
    bars("tokens_per_s.png", "Training throughput", "tokens/s", "train_tokens_per_s", fmt="{:.0f}")
    bars("peak_memory.png", "Peak training memory", "GiB", "train_peak_memory_gib")
    curves = {label: _last_per_step(histories.get(label, []), "loss") for label in labels}
    if any(steps for steps, _ in curves.values()):
        fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
        for label, (steps, loss) in curves.items():
            if steps:
                ax.plot(steps, loss, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title("Training loss by point", fontsize=11)
        ax.legend(frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png")
        plt.close(fig)
        written.append("loss.png")
    return written
