"""`qlora validate FILE`: everything that can be wrong with a training file, found before training.

    qlora validate data/train.jsonl --eval data/eval.jsonl --config configs/smollm2-135m.yaml

Errors (the file is not fit to train on; exit 1, each with file:line):
malformed JSON, unknown format or missing fields, empty or whitespace answers,
a chat template that fails to render, labels that do not end with EOS,
prompts that also appear in the holdout file (leakage).
Warnings (exit 0): duplicates, answers averaging under 50 words, examples
longer than max_seq_len (and how many would be truncated).

Preference pairs, KTO records and prompt-only records are checked as their kind
(data/preference_validate.py): one bad record is one error line, a record of
another kind than the file's first stops with its line.

It checks prepared chat JSONL: a CSV, a JSON list, a document or a folder is
sent to `qlora prepare` first, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .formats import answer_of, normalise_key, prompt_of
from .preference import KIND_NAMES, prompt_text, read_kind_lines
from .preference_validate import check_kind_records, warn_duplicates
from .tokenize import IGNORE, encode_record

MAX_LISTED = 20


@dataclass
class ValidationReport:
    path: str
    records: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"{self.path}: {self.records} records"]
        lines += [f"  {k}: {v}" for k, v in self.stats.items()]
        shown = self.errors[:MAX_LISTED]
        lines += [f"error: {e}" for e in shown]
        if len(self.errors) > len(shown):
            lines.append(f"error: ... and {len(self.errors) - len(shown)} more errors")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} error(s)")
        return "\n".join(lines)


def check_jsonl_input(path: str | Path, what: str = "qlora validate") -> Path:
    """The path of a prepared JSONL file, or one line that says what this input is and what to run instead."""
    from .sources import DOC_SUFFIXES

    path = Path(path)
    prepare = f"run 'qlora prepare --input {path}' first (it writes data/train.jsonl and data/eval.jsonl)"
    if path.is_dir():
        inside = next((f for f in (path / "train.jsonl", path / "eval.jsonl") if f.is_file()), None)
        raise UserError(
            f"'{path}' is a folder; {what} checks one prepared JSONL file: "
            + (f"pass {inside}" if inside else f"pass a .jsonl file, or {prepare}")
        )
    if not path.is_file():
        raise UserError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        with path.open(encoding="utf-8", errors="replace") as fh:
            is_list = fh.read(4096).lstrip().startswith("[")
    else:
        is_list = False
    if suffix in DOC_SUFFIXES or suffix in (".csv", ".tsv", ".parquet", ".arrow") or is_list:
        kind = "a JSON list" if is_list else f"a {suffix.lstrip('.').upper()} file"
        raise UserError(f"'{path}' is {kind}; {what} checks prepared chat JSONL: {prepare}")
    return path


def validate_file(
    path: str | Path, tokenizer=None, max_seq_len: int | None = None, eval_path: str | Path | None = None
) -> ValidationReport:
    path = check_jsonl_input(path)
    report = ValidationReport(str(path))
    kind, records = read_kind_lines(path, report.errors)
    report.records = len(records) + len(report.errors)
    if not records:
        report.errors.append(f"{path}: no valid record")
        return report
    if kind != "sft":
        check_kind_records(report, path, kind, records, tokenizer, max_seq_len)
        if eval_path:
            _check_leakage(report, path, kind, records, Path(eval_path))
        return report

    warn_duplicates(report, path, records, lambda rec: (normalise_key(prompt_of(rec)), normalise_key(answer_of(rec))))
    words = [len(answer_of(r).split()) for _, r in records]
    avg = sum(words) / len(words)
    report.stats["answers"] = (
        f"{len(records)} valid, average {avg:.1f} words, shortest {min(words)}, longest {max(words)}"
    )
    tool_records = sum("tools" in r for _, r in records)
    if tool_records:
        report.stats["tool use"] = f"{tool_records} records declare tools; their calls fit the schemas"
    if avg < 50 and 2 * tool_records < len(records):  # calls are short by nature
        report.warnings.append(
            f"answers average {avg:.1f} words (under 50): short answers teach the model little style or substance"
        )

    if tokenizer is not None:
        lengths, truncated, no_eos = [], [], []
        for lineno, rec in records:
            where = f"{path}:{lineno}"
            try:
                ex = encode_record(tokenizer, rec, max_seq_len or 10**9)
            except Exception as err:  # noqa: BLE001 - template errors come in many types
                report.errors.append(f"{where}: the chat template failed to render: {str(err).splitlines()[0]}")
                continue
            lengths.append(ex["length"])
            if ex["truncated"]:
                truncated.append(where)
                continue
            labelled = [lab for lab in ex["labels"] if lab != IGNORE]
            if not labelled or labelled[-1] != tokenizer.eos_token_id:
                no_eos.append(where)
        for where in no_eos:
            report.errors.append(
                f"{where}: the labels do not end with the EOS token "
                f"'{tokenizer.eos_token}', so the model would not learn to stop"
            )
        if lengths:
            lengths.sort()
            report.stats["tokens"] = f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}, total {sum(lengths)}"
        if truncated:
            report.warnings.append(
                f"{len(truncated)} of {len(records)} records exceed max_seq_len "
                f"{max_seq_len} tokens and would be truncated (e.g. {truncated[0]}); "
                f"raise data.max_seq_len or shorten them"
            )

    if eval_path:
        _check_leakage(report, path, kind, records, Path(eval_path))
    return report


def _check_leakage(report: ValidationReport, path: Path, kind: str, records: list, eval_path: Path) -> None:
    """An error for each holdout record whose prompt is also in the training file."""
    eval_kind, holdout = read_kind_lines(eval_path, [])
    if holdout and eval_kind != kind:
        report.errors.append(
            f"{eval_path}: holds {KIND_NAMES[eval_kind][1]} and {path} {KIND_NAMES[kind][1]}; "
            f"a holdout file holds the kind of its training file"
        )
        return
    train_prompts: dict[str, int] = {}
    for n, r in records:
        train_prompts.setdefault(normalise_key(prompt_text(r)), n)
    for lineno, rec in holdout:
        n = train_prompts.get(normalise_key(prompt_text(rec)))
        if n is not None:
            report.errors.append(
                f"{eval_path}:{lineno}: the same prompt is in {path}:{n} "
                f"(train/holdout leakage inflates the evaluation)"
            )
    report.stats["holdout"] = f"{len(holdout)} records checked for leakage"
