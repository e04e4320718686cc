"""Retrieval in `qlora eval --rag INDEX`: how often the index finds a question's own passage, and
what the passages do to the keyword benchmark.

    hits = retrieval_hits(grounding, "data/eval.jsonl")   # None when no holdout record names its source

A holdout record that names its `source` (`json.html#json.dumps`: the document's path, or its
end, and the heading of the section the answer came from; `qlora prepare --sample` writes
them) is a question whose passage is known. hit@k is the share of those questions with a
chunk of that file and heading among the first k passages, hit@1 among the first, MRR the
mean of 1/rank within k (0 when not found); all three retrieval modes are measured, so the
choice of mode rests on this index's own numbers. The keyword benchmark then runs again with
each prompt grounded in its retrieved passages, for base and tuned: the 2 x 2 table.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from ..data.formats import iter_jsonl
from ..rag.retrieve import Passage
from ..rag.settings import MODES


def known_sources(eval_file: str) -> list[tuple[str, str]]:
    """(question, source) of the holdout chat records whose source names a file and a heading."""
    out = []
    for _, obj in iter_jsonl(eval_file):
        source, messages = (obj.get("source"), obj.get("messages")) if isinstance(obj, dict) else (None, None)
        if not isinstance(source, str) or "#" not in source or not isinstance(messages, list):
            continue
        question = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        if isinstance(question, str) and question.strip():
            out.append((question, source))
    return out


def is_hit(passage: Passage, source: str) -> bool:
    """Whether a passage comes from the file and heading `source` names (the path may be its end)."""
    file, heading = source.split("#", 1)
    want = PurePosixPath(file.replace("\\", "/")).parts
    have = PurePosixPath(passage.source.replace("\\", "/")).parts
    return passage.heading == " ".join(heading.split()) and have[-len(want) :] == want


def retrieval_hits(grounding, eval_file: str, log=print, examples: int = 3) -> dict | None:
    pairs = known_sources(eval_file)
    if not pairs:
        log(f"retrieval: no record of '{eval_file}' names its source (file#heading): hit@k not measured")
        return None
    k, questions = grounding.settings.k, [q for q, _ in pairs]
    out: dict = {"questions": len(pairs), "k": k, "mode": grounding.settings.mode}
    for mode in MODES:
        found = grounding.retriever.search(questions, k, mode)
        ranks = [next((r for r, p in enumerate(ps, 1) if is_hit(p, src)), None) for ps, (_, src) in zip(found, pairs)]
        out[mode] = {
            "hit_at_1": sum(r == 1 for r in ranks) / len(ranks),
            f"hit_at_{k}": sum(r is not None for r in ranks) / len(ranks),
            "mrr": sum(1 / r for r in ranks if r) / len(ranks),
        }
        if mode == grounding.settings.mode:
            out["misses"] = [
                {"question": q, "source": src, "found": [p.label() for p in ps[:3]]}
                for (q, src), ps, r in zip(pairs, found, ranks)
                if r is None
            ][:examples]
    main = out[grounding.settings.mode]
    log(
        f"retrieval ({grounding.settings.mode}): hit@{k} {main[f'hit_at_{k}']:.3f}, hit@1 {main['hit_at_1']:.3f} "
        f"on {len(pairs)} holdout questions with a known source"
    )
    return out


def grounded_prompts(grounding, engine, prompts: list[str], system: str | None, max_new_tokens: int):
    """(prompt ids, passages used) of each benchmark prompt with its retrieved passages."""
    from ..infer.generation import single_turn

    found = grounding.passages(prompts)
    return [
        grounding.prompt(engine, single_turn(p, system), max_new_tokens, passages=ps) for p, ps in zip(prompts, found)
    ]


def retrieval_markdown(r: dict) -> list[str]:
    k = r["k"]
    lines = ["## Retrieval", "", f"Index: {r['index']}.", ""]
    hits = r.get("hits")
    if hits:
        lines += [
            f"{hits['questions']} holdout questions whose source passage is known (the record's `source`: "
            f"file and heading). hit@{k}: the source among the first {k} passages; MRR: mean 1/rank within {k}.",
            "",
            f"| mode | hit@1 | hit@{k} | MRR |",
            "|---|---|---|---|",
        ]
        for mode in MODES:
            m = hits[mode]
            mark = " (used)" if mode == hits["mode"] else ""
            lines.append(f"| {mode}{mark} | {m['hit_at_1']:.3f} | {m[f'hit_at_{k}']:.3f} | {m['mrr']:.3f} |")
        lines.append("")
        for miss in hits.get("misses", []):
            lines.append(f"- missed: {miss['question']} (`{miss['source']}`; found {'; '.join(miss['found'])})")
        if hits.get("misses"):
            lines.append("")
    else:
        lines += ["hit@k: not measured (no holdout record names its source).", ""]
    rate = r.get("keyword_pass_rate")
    if rate:
        n = r["prompts"]
        lines += [
            f"Keyword pass rate, with and without the retrieved passages in the prompt ({r['mode']} retrieval, "
            f"{r['passages_per_prompt']:.1f} passages per prompt on average, at most {r['budget']} tokens of them):",
            "",
            "| | without retrieval | with retrieval |",
            "|---|---|---|",
        ]
        for side in ("base", "tuned"):
            without, with_ = rate[side]["without"], rate[side]["with"]
            lines.append(
                f"| {side} | {100 * without:.1f}% ({round(without * n)}/{n}) | "
                f"{100 * with_:.1f}% ({round(with_ * n)}/{n}) |"
            )
        lines.append("")
    return lines
