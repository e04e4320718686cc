"""Tool-call accuracy for `qlora eval`: does the model call the right tool with the right arguments,
and answer without a call when none is needed? Base against tuned, on the holdout's tool records.

    scores = tool_call_scores(loaded, "data/tools/eval.jsonl")   # None when the file holds no tool record
    scores["exact_match"]["base"], scores["exact_match"]["tuned"]

Each tool record gives one decision: its first assistant turn, after the messages before it
(the tools declared, the user's question). Both models answer greedily, in the format training
rendered (data/tools.py), with room for the longest reference turn's calls and 16 tokens more (at
least 32, at most 256 new tokens), and the calls are parsed back from the text. Over the turns whose
reference holds calls:

- `valid_call_rate`: the answer holds at least one call, and every call parses, names a declared
  tool and has arguments that fit its JSON schema;
- `right_function`: the called functions are the reference's (as a multiset of names);
- `exact_match`: the calls equal the reference's, arguments compared structurally (key order
  free, 2 == 2.0), in any order, with no block left unparsed.

Over the turns whose reference answers in text: `abstention`, the share answered with no call
(and no attempt at one). BFCL scores calls the same structural way; the turns that need no tool
are its "irrelevance" category.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..data.formats import load_records
from ..data.tools import call_text, calls_equal, calls_of, check_calls, parse_tool_calls, tools_by_name
from ..infer.sampling import SamplingParams

MAX_NEW_TOKENS = 256
MIN_NEW_TOKENS = 32
MARGIN_TOKENS = 16  # beyond the longest reference turn: a longer call is not the reference's anyway
EXAMPLES = 6  # decisions shown in eval.md, those where base and tuned differ first
METRICS = ("exact_match", "right_function", "valid_call_rate", "abstention")
DEFINITIONS = {
    "exact_match": "the calls equal the reference's (name and arguments, structurally), of turns that need a call",
    "right_function": "the called functions are the reference's, of turns that need a call",
    "valid_call_rate": "the answer holds calls that all parse and fit a declared tool's schema, of turns that need one",
    "abstention": "answered in text with no call, of turns that need no tool",
}


def decisions(records: list[dict]) -> list[dict]:
    """One decision per tool record: the messages before its first assistant turn, its tools and the
    reference calls (empty: the reference answers in text)."""
    out = []
    for rec in records:
        if "tools" not in rec:
            continue
        first = next(i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant")
        out.append(
            {
                "history": rec["messages"][:first],
                "tools": rec["tools"],
                "expected": calls_of(rec["messages"][first]),
                "reference": rec["messages"][first]["content"],
            }
        )
    return out


def judge(text: str, decision: dict) -> dict:
    """The verdicts on one generated answer to one decision."""
    parsed = parse_tool_calls(text)
    errors = check_calls(parsed, tools_by_name(decision["tools"]))
    expected = decision["expected"]
    names = sorted(c["name"] for c in parsed.calls)
    return {
        "text": text,
        "calls": parsed.calls,
        "errors": errors,
        "valid": bool(parsed.calls) and not errors,
        "right_function": bool(expected) and names == sorted(c["name"] for c in expected),
        "exact_match": bool(expected) and not parsed.errors and calls_equal(expected, parsed.calls),
        "abstained": not parsed.calls and not parsed.errors,
    }


def summarise(verdicts: list[dict], decisions_: list[dict]) -> dict:
    """The four rates over one model's verdicts (None where no turn of that sort exists)."""
    calls = [v for v, d in zip(verdicts, decisions_) if d["expected"]]
    texts = [v for v, d in zip(verdicts, decisions_) if not d["expected"]]

    def rate(rows: list[dict], key: str) -> float | None:
        return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else None

    return {
        "exact_match": rate(calls, "exact_match"),
        "right_function": rate(calls, "right_function"),
        "valid_call_rate": rate(calls, "valid"),
        "abstention": rate(texts, "abstained"),
    }


def token_budget(tokenizer, todo: list[dict]) -> int:
    """New tokens per answer: room for the longest reference turn's calls (all of them, for parallel
    calls) and a margin, within [MIN, MAX]. A text answer needs only as many to show whether it calls."""
    longest = max(
        (
            len(
                tokenizer(
                    "\n".join(call_text(c["name"], c["arguments"]) for c in d["expected"]), add_special_tokens=False
                )["input_ids"]
            )
            for d in todo
            if d["expected"]
        ),
        default=0,
    )
    return min(MAX_NEW_TOKENS, max(MIN_NEW_TOKENS, longest + MARGIN_TOKENS))


def _generate(loaded, prompts: list[list[int]], batch_size: int, max_new_tokens: int, side: str) -> list[str]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    texts: list[str] = []
    for k in tqdm(range(0, len(prompts), batch_size), desc=f"tool calls ({side})", unit="batch", leave=False):
        texts += [g.text for g in loaded.engine.generate(prompts[k : k + batch_size], params)]
    return texts


def tool_call_scores(loaded, eval_file: str, batch_size: int = 8, log=print) -> dict | None:
    """Tool-call metrics of base and tuned on the tool records of `eval_file`; None when it has none."""
    todo = decisions(load_records(eval_file, "eval_file"))
    if not todo:
        return None
    prompts = [loaded.engine.encode_chat(d["history"], tools=d["tools"]) for d in todo]
    budget = token_budget(loaded.engine.tokenizer, todo)
    need_call = sum(bool(d["expected"]) for d in todo)
    log(f"tool calls: {len(todo)} holdout decisions ({need_call} need a call), greedy, at most {budget} new tokens")
    with loaded.base_only():
        base = [judge(t, d) for t, d in zip(_generate(loaded, prompts, batch_size, budget, "base"), todo)]
    tuned = [judge(t, d) for t, d in zip(_generate(loaded, prompts, batch_size, budget, "tuned"), todo)]
    sides = {"base": summarise(base, todo), "tuned": summarise(tuned, todo)}
    right = {
        side: [v["exact_match"] if d["expected"] else v["abstained"] for v, d in zip(verdicts, todo)]
        for side, verdicts in (("base", base), ("tuned", tuned))
    }
    order = sorted(range(len(todo)), key=lambda i: right["base"][i] == right["tuned"][i])
    examples = [
        {
            "prompt": next(m["content"] for m in reversed(todo[i]["history"]) if m["role"] == "user"),
            "expected": todo[i]["expected"],
            "base": base[i]["text"],
            "tuned": tuned[i]["text"],
            "base_right": right["base"][i],
            "tuned_right": right["tuned"][i],
        }
        for i in order[:EXAMPLES]
    ]
    scores: dict = {m: {side: sides[side][m] for side in sides} for m in METRICS}
    scores.update(
        {
            "decisions": len(todo),
            "need_call": need_call,
            "need_text": len(todo) - need_call,
            "eval_file": str(eval_file),
            "max_new_tokens": budget,
            "definitions": DEFINITIONS,
            "examples": examples,
        }
    )
    em = scores["exact_match"]
    log(f"tool calls: exact match base {em['base']} -> tuned {em['tuned']}")
    return scores


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def tool_calls_markdown(scores: dict) -> list[str]:
    """eval.md's tool-call section: the rates, how each is defined, and answers side by side."""
    lines = [
        "## Tool calls",
        "",
        f"{scores['decisions']} holdout decisions of `{scores['eval_file']}`: {scores['need_call']} need a call, "
        f"{scores['need_text']} need none. Greedy, at most {scores['max_new_tokens']} new tokens; calls are parsed "
        f"from the text and checked against the declared JSON schemas.",
        "",
        "| metric | base | tuned | definition |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        lines.append(f"| {m} | {_pct(scores[m]['base'])} | {_pct(scores[m]['tuned'])} | {scores['definitions'][m]} |")
    lines.append("")
    for ex in scores["examples"]:
        want = "; ".join(f"{c['name']}({c['arguments']})" for c in ex["expected"]) or "an answer with no call"
        lines += [f"**{' '.join(ex['prompt'].split())}** (expected: {want})", ""]
        for side in ("base", "tuned"):
            verdict = "right" if ex[f"{side}_right"] else "wrong"
            block = "\n".join("    " + line for line in (ex[side] or "(empty)").splitlines()) or "    (empty)"
            lines += [f"{side} ({verdict}):", "", block, ""]
    return lines
