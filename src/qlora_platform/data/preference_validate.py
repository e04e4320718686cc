"""`qlora validate` for preference pairs, KTO records and prompt-only records.

The record-level errors (a pair without `rejected` or `chosen`, an empty answer, chosen equal to
rejected, a KTO label that is not a boolean) come from the converters in `preference.py` while the
file is read. Here come the file-level findings, as for SFT files:

- warnings: duplicates; chosen answers or completions averaging under 50 words; KTO labels that are
  all true or all false; records longer than max_seq_len, counted as prompt + the longer answer in
  tokens (the prompt would lose tokens from the left), or whose answer alone does not fit (dropped);
- errors: a chat template that fails to render.

    check_kind_records(report, path, "preference", records, tokenizer, max_seq_len)
"""

from __future__ import annotations

from .preference import record_key
from .preference_tokenize import token_lengths


def _words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(1, len(texts))


def _answer_stats(report, kind: str, records: list[dict]) -> None:
    n = len(records)
    if kind == "preference":
        avg, rejected = _words([r["chosen"] for r in records]), _words([r["rejected"] for r in records])
        report.stats["pairs"] = f"{n} valid, chosen average {avg:.1f} words, rejected average {rejected:.1f} words"
    elif kind == "kto":
        avg = _words([r["completion"] for r in records])
        good = sum(r["label"] for r in records)
        report.stats["completions"] = f"{n} valid ({good} desirable, {n - good} undesirable), average {avg:.1f} words"
        if good in (0, n):
            report.warnings.append(
                f"every KTO label is {str(bool(good)).lower()}; KTO learns from desirable and undesirable "
                f"completions both (add some of the other label)"
            )
    else:
        avg = _words([r["prompt"][-1]["content"] for r in records])
        report.stats["prompts"] = f"{n} valid, average {avg:.1f} words"
        return
    if avg < 50:
        what = "chosen answers" if kind == "preference" else "completions"
        report.warnings.append(
            f"{what} average {avg:.1f} words (under 50): short answers teach the model little style or substance"
        )


def warn_duplicates(report, path, numbered: list[tuple[int, dict]], key_of) -> None:
    """One warning naming the first repeated records, where `key_of(record)` says what repeats."""
    seen: dict[tuple, int] = {}
    duplicates = []
    for lineno, rec in numbered:
        key = key_of(rec)
        if key in seen:
            duplicates.append(f"{path}:{lineno} repeats line {seen[key]}")
        else:
            seen[key] = lineno
    if duplicates:
        report.warnings.append(
            f"{len(duplicates)} duplicate record(s), e.g. {'; '.join(duplicates[:3])} ('qlora prepare' removes them)"
        )


def _lengths(report, path, kind: str, numbered: list[tuple[int, dict]], tokenizer, max_seq_len: int | None) -> None:
    lengths, cut, dropped = [], [], []
    for lineno, rec in numbered:
        where = f"{path}:{lineno}"
        try:
            prompt_len, answer_len = token_lengths(tokenizer, rec)
        except Exception as err:  # noqa: BLE001 - template errors come in many types
            report.errors.append(f"{where}: the chat template failed to render: {str(err).splitlines()[0]}")
            continue
        lengths.append(prompt_len + answer_len)
        if max_seq_len and prompt_len + answer_len > max_seq_len:
            (dropped if kind != "prompt" and answer_len >= max_seq_len else cut).append(where)
    if lengths:
        lengths.sort()
        report.stats["tokens"] = f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}, total {sum(lengths)}"
    answer = {"preference": "the longer answer", "kto": "the completion"}.get(kind)
    if cut:
        report.warnings.append(
            f"{len(cut)} of {len(numbered)} records exceed max_seq_len {max_seq_len} tokens"
            f"{f' (prompt + {answer})' if answer else ''} and their prompts would lose tokens from the left "
            f"(e.g. {cut[0]}); raise data.max_seq_len or shorten them"
        )
    if dropped:
        report.warnings.append(
            f"{len(dropped)} of {len(numbered)} records would be dropped: {answer} alone leaves no room for the "
            f"prompt in max_seq_len {max_seq_len} tokens (e.g. {dropped[0]}); raise data.max_seq_len or shorten it"
        )


def check_kind_records(
    report, path, kind: str, numbered: list[tuple[int, dict]], tokenizer=None, max_seq_len: int | None = None
) -> None:
    """Add the findings on a file's valid non-SFT records (with their line numbers) to a ValidationReport."""
    records = [rec for _, rec in numbered]
    warn_duplicates(report, path, numbered, record_key)
    _answer_stats(report, kind, records)
    if tokenizer is not None:
        _lengths(report, path, kind, numbered, tokenizer, max_seq_len)
