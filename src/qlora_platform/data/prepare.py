"""`qlora prepare`: raw inputs to `train.jsonl` + `eval.jsonl` in chat form.

    qlora prepare --sample                                # the offline stdlib data set (+ its documents)
    qlora prepare --sample-preferences --out-dir data/pref   # the same questions as preference pairs
    qlora prepare --sample-tools --out-dir data/tools        # tool calls over the sample domain
    qlora prepare --input faq.csv --columns instruction=question,output=answer
    qlora prepare --input notes.jsonl --input manual.pdf --doc-mode qa
    qlora prepare --input tatsu-lab/alpaca --format hf

Inputs are read by their type (JSONL/JSON, CSV, PDF/HTML/Markdown/text, a
folder of such files, or a Hugging Face dataset), normalised to chat records,
checked, deduplicated and split into a seeded holdout with no prompt on both
sides. Preference pairs, KTO records and prompt-only records (data/preference.py)
are detected and written in their own normalised shapes; one run holds one kind.
A bad record (a malformed JSON line included) stops the run with its
file and line, unless `--skip-invalid` is given; then it is dropped and counted.
Every dropped record is reported. The output folder holds this run's files
only: an `eval.jsonl` left by an earlier run is removed when this run has no
holdout.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import UserError
from .formats import (
    FORMATS,
    detect_format,
    iter_jsonl_lines,
    parse_jsonl_line,
    to_chat_record,
    write_jsonl,
)
from .preference import KIND_NAMES, KindGuard, answer_words, detect_kind, record_key, split_records, to_kind_record
from .preference_sample import build_sample_preferences
from .sample import build_sample_records, sample_entries, write_sample_documents
from .sources import DOC_SUFFIXES, columns_hint, csv_to_jsonl, document_records, hf_dataset_to_jsonl
from .tools_sample import build_sample_tool_records

RECORD_SUFFIXES = {".jsonl", ".json", ".csv"}
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def folder_inputs(path: Path, wanted: set[str] = RECORD_SUFFIXES | DOC_SUFFIXES) -> list[Path]:
    """The files of a folder with one of the `wanted` suffixes (records and documents by default),
    searched recursively, hidden ones left out, in a stable order."""
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix.lower() in wanted
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )


def read_source(
    source: str, fmt: str = "auto", mapping: dict | None = None, doc_mode: str = "qa", split: str = "train"
) -> list[tuple[str, dict | UserError]]:
    """(where, raw record) pairs from one input; a JSONL line that is not a JSON object comes as the
    UserError that describes it, so the caller can stop or skip and count it."""
    path = Path(source)
    suffix = path.suffix.lower()
    if fmt == "hf" or (not path.exists() and "/" in source and suffix not in RECORD_SUFFIXES):
        return hf_dataset_to_jsonl(source, split=split, mapping=mapping)
    if path.is_dir():
        files = [] if any((path / m).is_file() for m in HF_DISK_MARKERS) else folder_inputs(path)
        if not files:  # a `save_to_disk` folder, or data files only the datasets library reads (parquet)
            return hf_dataset_to_jsonl(source, split=split, mapping=mapping)
        # Every file by its own type, so a folder mixing CSV, JSONL and documents uses all of them.
        return [row for f in files for row in read_source(str(f), fmt, mapping, doc_mode, split)]
    if not path.exists():
        raise UserError(f"input '{source}' does not exist")
    if suffix == ".jsonl":
        rows = []
        for n, line in iter_jsonl_lines(path):
            try:
                rows.append((f"{path}:{n}", parse_jsonl_line(line, f"{path}:{n}")))
            except UserError as err:
                rows.append((f"{path}:{n}", err))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json input must hold a list of records (or use .jsonl)")
        rows = [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]
    elif suffix == ".csv":
        return csv_to_jsonl(path, mapping)
    elif suffix in DOC_SUFFIXES:
        return document_records(path, mode=doc_mode)
    else:
        raise UserError(
            f"{path}: unsupported input type '{suffix}'; use .jsonl, .json, .csv, "
            f"{', '.join(sorted(DOC_SUFFIXES))} or a Hugging Face dataset (--format hf)"
        )
    if mapping:
        rows = [
            (w, obj if isinstance(obj, UserError) else {field: obj.get(col) for field, col in mapping.items()})
            for w, obj in rows
        ]
    return rows


def _check_record(raw, where: str, record_fmt: str, mapped: bool, kind: str = "sft") -> dict:
    """One raw record as a chat record (or a record of another kind), or the UserError that says what is wrong."""
    if isinstance(raw, UserError):
        raise raw
    if kind != "sft":
        return to_kind_record(raw, where, kind)
    if not mapped and isinstance(raw, dict) and record_fmt == "auto" and detect_format(raw) is None:
        keys = ", ".join(sorted(raw)) or "none"
        raise UserError(
            f"{where}: unknown record format (keys: {keys}); map its fields with "
            f"{columns_hint(list(raw))}, or use messages, conversations, instruction/output, "
            f"prompt/completion or text records"
        )
    return to_chat_record(raw, where, record_fmt)


def _stale_eval(out_dir: Path) -> Path | None:
    """`eval.jsonl` in the output folder, when an earlier `qlora prepare` wrote it (its report says so)."""
    eval_file = out_dir / "eval.jsonl"
    if not eval_file.exists():
        return None
    try:
        earlier = json.loads((out_dir / "prepare_report.json").read_text())
    except (OSError, ValueError):
        earlier = {}
    # prepare writes its report and eval.jsonl into the same folder, so a report there that names an eval
    # file (relative paths differ between working directories) means an earlier run wrote this one.
    if not isinstance(earlier, dict) or Path(str(earlier.get("eval_file") or "")).name != eval_file.name:
        raise UserError(
            f"this run writes no holdout, and '{eval_file}' (not written by qlora prepare) would be read "
            f"as one by the default config; move it away, or give --out-dir a folder without it"
        )
    return eval_file


def prepare(
    inputs: list[str],
    out_dir: str | Path = "data",
    fmt: str = "auto",
    mapping: dict | None = None,
    doc_mode: str = "qa",
    eval_ratio: float = 0.1,
    seed: int = 42,
    skip_invalid: bool = False,
    sample: bool = False,
    split: str = "train",
    sample_preferences: bool = False,
    sample_tools: bool = False,
) -> dict:
    """Write train/eval JSONL and return the report (also written as prepare_report.json)."""
    if fmt not in ("auto", "hf", *FORMATS):
        raise UserError(f"--format must be auto, hf or one of {', '.join(FORMATS)}; got '{fmt}'")
    if not 0 <= eval_ratio < 1:
        raise UserError(f"--eval-ratio must be in [0, 1), got {eval_ratio}")
    samples = [
        flag
        for flag, on in (
            ("--sample", sample),
            ("--sample-preferences", sample_preferences),
            ("--sample-tools", sample_tools),
        )
        if on
    ]
    if not inputs and not samples:
        raise UserError(
            "nothing to prepare: give --input FILE (repeatable), --sample, --sample-preferences or --sample-tools"
        )
    if len(samples) > 1:
        raise UserError(f"{' and '.join(samples)} are separate data sets; one run writes one of them")
    records: list[dict] = []
    invalid: Counter = Counter()
    first_invalid: list[str] = []
    raw_count = 0
    guard = KindGuard()
    entries = sample_entries() if sample else []  # read once: for the records and for the documents
    if sample:
        records += build_sample_records(entries=entries)
        guard.check("sft", "the --sample set")
    if sample_tools:
        records += build_sample_tool_records(seed)
        guard.check("sft", "the --sample-tools set")
    preset: dict[int, bool] = {}  # id(record) -> holdout, for sets that come split already
    if sample_preferences:
        pref_train, pref_holdout = build_sample_preferences(seed, eval_ratio)
        preset.update({id(r): False for r in pref_train} | {id(r): True for r in pref_holdout})
        records += pref_train + pref_holdout
        guard.check("preference", "the --sample-preferences set")
    raw_count += len(records)
    record_fmt = "auto" if fmt == "hf" else fmt
    for source in inputs:
        for where, raw in read_source(source, fmt, mapping, doc_mode, split):
            raw_count += 1
            # The kind comes from the record unless --format names an SFT one; another kind stops even --skip-invalid.
            kind = detect_kind(raw) if record_fmt == "auto" and isinstance(raw, dict) else "sft"
            if not isinstance(raw, UserError):
                guard.check(kind, where)
            try:
                records.append(_check_record(raw, where, record_fmt, bool(mapping), kind))
            except UserError as err:
                if not skip_invalid:
                    raise UserError(f"{err} (or pass --skip-invalid to drop and count such records)") from None
                reason = str(err).split(": ", 1)[-1]
                invalid[reason.split(";")[0][:80]] += 1
                if len(first_invalid) < 5:
                    first_invalid.append(str(err))

    seen, unique, duplicates = set(), [], 0
    for rec in records:
        key = record_key(rec)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        unique.append(rec)
    if not unique:
        if not raw_count:
            raise UserError(f"no record to write: the input(s) {', '.join(inputs)} hold no records")
        raise UserError(
            f"no valid record left to write: all {raw_count} records were invalid, e.g. {' | '.join(first_invalid[:3])}"
        )
    train, holdout = split_records([r for r in unique if id(r) not in preset], eval_ratio, seed)
    train += [r for r in unique if preset.get(id(r)) is False]
    holdout += [r for r in unique if preset.get(id(r)) is True]
    out_dir = Path(out_dir)
    stale = None if holdout else _stale_eval(out_dir)
    write_jsonl(out_dir / "train.jsonl", train)
    if holdout:
        write_jsonl(out_dir / "eval.jsonl", holdout)
    elif stale:
        stale.unlink()
    words = [n for n in map(answer_words, unique) if n is not None]
    # The documentation the sample set is made from, for retrieval (`qlora rag index --input <out>/docs`).
    documents = write_sample_documents(out_dir / "docs", entries) if sample else []
    report = {
        "inputs": (["sample:python-stdlib"] if sample else [])
        + (["sample:python-stdlib-preferences"] if sample_preferences else [])
        + (["sample:tools"] if sample_tools else [])
        + list(inputs),
        "kind": guard.kind or "sft",
        "records_read": raw_count,
        "invalid_dropped": sum(invalid.values()),
        "invalid_reasons": dict(invalid),
        "invalid_examples": first_invalid,
        "duplicates_dropped": duplicates,
        "written": len(unique),
        "train": len(train),
        "eval": len(holdout),
        "eval_ratio": eval_ratio,
        "avg_answer_words": round(sum(words) / len(words), 1) if words else None,
        "tool_records": sum("tools" in r for r in unique),
        "categories": dict(Counter(str(r.get("category", "")) for r in unique)),
        "train_file": str(out_dir / "train.jsonl"),
        "eval_file": str(out_dir / "eval.jsonl") if holdout else None,
        "removed_stale": [str(stale)] if stale else [],
        "documents": {"folder": str(out_dir / "docs"), "files": len(documents)} if documents else None,
    }
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    kind = report.get("kind", "sft")
    lines = [
        f"read {report['records_read']} records; wrote {report['written']}"
        f"{'' if kind == 'sft' else ' ' + KIND_NAMES[kind][1]} "
        f"({report['train']} train -> {report['train_file']}, {report['eval']} holdout"
        f"{' -> ' + report['eval_file'] if report['eval_file'] else ''})",
        f"dropped: {report['duplicates_dropped']} duplicates, {report['invalid_dropped']} invalid",
    ]
    if report["avg_answer_words"] is not None:
        answer = {"preference": "chosen answer", "kto": "completion"}.get(kind, "answer")
        lines.append(f"average {answer} length: {report['avg_answer_words']} words")
    for reason, n in report["invalid_reasons"].items():
        lines.append(f"  invalid x{n}: {reason}")
    for example in report.get("invalid_examples", [])[:3]:
        lines.append(f"  e.g. {example}")
    for stale in report.get("removed_stale", []):
        lines.append(
            f"removed {stale}: an earlier run's holdout; this run has none (--eval-ratio "
            f"{report.get('eval_ratio', 0)}), so no stale file is read as one"
        )
    if report.get("documents"):
        docs = report["documents"]
        lines.append(
            f"sample documents: {docs['files']} HTML pages -> {docs['folder']} "
            f"(for retrieval: qlora rag index --input {docs['folder']})"
        )
    if report.get("tool_records"):
        lines.append(f"tool-use records: {report['tool_records']} (calls checked against their tools' schemas)")
    # Calls are short by nature: the length warning is for chat answers.
    short = report["avg_answer_words"] is not None and report["avg_answer_words"] < 50
    if short and 2 * report.get("tool_records", 0) < report["written"]:
        lines.append("warning: answers average under 50 words; short answers teach little (see 'qlora validate')")
    return "\n".join(lines)
