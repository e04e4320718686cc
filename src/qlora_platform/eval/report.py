"""The evaluation report: `eval.json` for machines, `eval.md` for people.

    write_report(out_dir, report)     # report: the dict `eval.run.run_eval` builds

`eval.json` keys that scripts rely on: `perplexity.base`, `perplexity.tuned`,
`keyword_pass_rate.base`, `keyword_pass_rate.tuned` (`keyword_pass_rate` is null when the benchmark
did not run: a tool-use holdout without --prompts; schema version 2),
`preference.accuracy.base` / `.tuned` and `preference.margin.base` / `.tuned` (a DPO run's report,
which has these instead of `perplexity`; eval/preference.py defines them),
`tool_calls.exact_match.base` / `.tuned`, `.right_function`, `.valid_call_rate` and `.abstention` (a holdout
with tool records; eval/tools.py defines them), `retrieval.hits.<mode>.hit_at_<k>` and
`retrieval.keyword_pass_rate.<base|tuned>.<without|with>` (`qlora eval --rag`; eval/retrieval.py
defines them), `tokens_per_s` (batch-1 decode
of the tuned model), `speed`, `keyword_benchmark`, `prompts`, `train`, `plots`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .preference import preference_markdown
from .retrieval import retrieval_markdown
from .reward import alignment_markdown
from .rl import rl_markdown
from .tools import tool_calls_markdown

SCHEMA_VERSION = 2


def _cell(text: str, limit: int = 0) -> str:
    text = " ".join(str(text).split())
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _answer_block(text: str) -> str:
    # Indented code keeps model output (markdown, backticks, HTML) from changing the page.
    return "\n".join("    " + line for line in (text or "(empty)").splitlines()) or "    (empty)"


def _perplexity_rows(ppl: dict | None) -> list[str]:
    if ppl is None:
        return []
    change = (
        f"{ppl['reduction_pct']:.1f}% lower" if ppl["reduction_pct"] >= 0 else f"{-ppl['reduction_pct']:.1f}% higher"
    )
    return [
        f"| holdout perplexity | {ppl['base']:.3f} | {ppl['tuned']:.3f} ({change}) |",
        f"| holdout loss (nats/token) | {ppl['base_loss']:.4f} | {ppl['tuned_loss']:.4f} |",
    ]


def _perplexity_note(ppl: dict | None) -> list[str]:
    if ppl is None:
        return []
    return [
        f"Perplexity is exp of the mean negative log-likelihood over the assistant-answer tokens only "
        f"(prompts and system text excluded), token-weighted: {ppl['tokens']} tokens in "
        f"{ppl['examples']} holdout examples of `{ppl['eval_file']}` (max {ppl['max_seq_len']} tokens each). "
        f"Base = the same weights with the LoRA adapter switched off.",
        "",
    ]


def _keyword_lines(report: dict) -> list[str]:
    """The keyword benchmark's table and the answers side by side."""
    bench = report["keyword_benchmark"]
    gen = bench["generation"]
    lines = [
        "## Keyword benchmark",
        "",
        f"`{bench['file']}` ({bench['name']}): {bench['prompts']} prompts, greedy decoding, "
        f"max {gen['max_new_tokens']} new tokens, repetition penalty {gen['repetition_penalty']}. "
        f"A prompt passes when the answer names at least the needed number of its keywords "
        f"(case-insensitive, whole words).",
        "",
    ]
    if bench.get("in_training_data") is not None:
        lines += [
            f"{bench['in_training_data']} of the {bench['prompts']} prompts appear word for word "
            f"among the training questions.",
            "",
        ]
    lines += ["| prompt | keywords | needed | base hits | tuned hits | base | tuned |", "|---|---|---|---|---|---|---|"]
    for p in report["prompts"]:
        lines.append(
            f"| {_cell(p['id'])} | {_cell('; '.join(p['keywords']), 60)} | {p['needed']} | "
            f"{_cell(', '.join(p['base']['hits']) or '-', 40)} | {_cell(', '.join(p['tuned']['hits']) or '-', 40)} | "
            f"{'pass' if p['base']['passed'] else 'fail'} | {'pass' if p['tuned']['passed'] else 'fail'} |"
        )
    lines += ["", "## Answers side by side", ""]
    for p in report["prompts"][: report["samples_shown"]]:
        lines += [
            f"### {_cell(p['id'])}: {_cell(p['prompt'])}",
            "",
            f"**base** ({'pass' if p['base']['passed'] else 'fail'}, {p['base']['tokens']} tokens):",
            "",
            _answer_block(p["base"]["answer"]),
            "",
            f"**tuned** ({'pass' if p['tuned']['passed'] else 'fail'}, {p['tuned']['tokens']} tokens):",
            "",
            _answer_block(p["tuned"]["answer"]),
            "",
        ]
    return lines


def _retrieval_answers(r: dict, shown: int = 3) -> list[str]:
    """The first benchmark answers given with retrieved passages, with their sources."""
    rows = (r.get("answers") or [])[:shown]
    lines = ["### Answers with retrieval", ""] if rows else []
    for row in rows:
        lines += [
            f"**{_cell(row['id'])}**: {_cell(row['prompt'])}",
            "",
            f"sources: {'; '.join(row['sources']) or 'none'}",
            "",
        ]
        for side in ("base", "tuned"):
            verdict = "pass" if row[side]["passed"] else "fail"
            lines += [f"{side} with retrieval ({verdict}):", "", _answer_block(row[side]["answer"]), ""]
    return lines


def render_markdown(report: dict) -> str:
    rate, speed, bench = report["keyword_pass_rate"], report["speed"], report["keyword_benchmark"]
    lines = [
        f"# Evaluation: {report['model']}",
        "",
        f"Adapter `{report['adapter']}` on {report['device']} ({report['weights']}), "
        f"{report['created']}. Reproduce: `{report['command']}`",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        *_perplexity_rows(report.get("perplexity")),
        *(
            [
                f"| keyword pass rate | {100 * rate['base']:.1f}% ({bench['base_passed']}/{bench['prompts']}) | "
                f"{100 * rate['tuned']:.1f}% ({bench['tuned_passed']}/{bench['prompts']}) |"
            ]
            if rate
            else []
        ),
        "",
        *_perplexity_note(report.get("perplexity")),
        *(preference_markdown(report["preference"]) if "preference" in report else []),
        *(rl_markdown(report["rl"]) if "rl" in report else []),
        *(tool_calls_markdown(report["tool_calls"]) if "tool_calls" in report else []),
        *alignment_markdown(report),
        *(retrieval_markdown(report["retrieval"]) if report.get("retrieval") else []),
        *(_retrieval_answers(report["retrieval"]) if report.get("retrieval") else []),
        "## Speed (tuned model, batch 1)",
        "",
        "| prefill tokens/s | decode tokens/s | time to first token | peak memory | device |",
        "|---|---|---|---|---|",
        f"| {speed['prefill_tokens_per_s']:.1f} | {speed['decode_tokens_per_s']:.1f} | {speed['ttft_ms']:.0f} ms | "
        f"{speed['peak_memory_gib']:.2f} GiB ({speed['peak_memory_kind']}) | {speed['device']} |",
        "",
        f"Median of {speed['runs']} runs after a warm-up: {speed['prompt_tokens']}-token prompt, "
        f"{speed['new_tokens']} new tokens, greedy, EOS ignored; LoRA unmerged.",
        "",
    ]
    if bench.get("skipped"):
        lines += ["## Keyword benchmark", "", f"Not run: {bench['skipped']}.", ""]
    else:
        lines += _keyword_lines(report)
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]] + [""]
    train = report.get("train")
    if train:
        lines += [
            "## Training run",
            "",
            f"{train.get('steps')} steps in {train.get('train_seconds')} s at {train.get('tokens_per_s')} "
            f"tokens/s, peak memory {train.get('peak_memory_gib')} GiB on {train.get('device')}; "
            f"training loss {train.get('train_loss_first', 0) or 0:.3f} -> {train.get('train_loss_last', 0) or 0:.3f}.",
            "",
        ]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "eval.md").write_text(render_markdown(report), encoding="utf-8")
