"""The offline preference set: the sample set's questions with a right and a plausible wrong answer.

Every pair of `build_sample_records` (the Python standard library assistant) becomes a preference
pair: `chosen` is its documented answer; `rejected` is the documented answer of a neighbour, so it
is fluent, on topic and wrong. The neighbour comes from the nearest scope that has one: for
`json.JSONDecoder.decode` another method of `json.JSONDecoder`, else another method of `json`, else
any function, method or class of `json`, else any method; for a module another module of its
package, else any module; for a topic any other topic. Neighbours that share half or more of the
words of the two answers (shared words over all their words) are passed over: they would be
near-right. The choice is drawn from a generator seeded with the seed and the question, so the set
is the same on every run of one Python version. A function, method or class answer ends with its
signature line; the wrong answer keeps the asked object's name on it with the neighbour's
parameters and documentation, so it reads as an answer to the question.

    train, holdout = build_sample_preferences(seed=42, eval_ratio=0.1)   # pairs: prompt, chosen, rejected, category

The questions are split into train and holdout before any wrong answer is drawn, and each side
draws from itself: no holdout question's right answer is a rejected answer in training.
`qlora prepare --sample-preferences` writes them as train.jsonl + eval.jsonl.
"""

from __future__ import annotations

import random
import re

from .sample import build_sample_records, split_signature, with_signature
from .split import split_holdout

OBJECT_CATEGORIES = ("function", "method", "class")
MAX_OVERLAP = 0.5


def _name(question: str) -> str:
    """The object a question asks about (in backticks); '' for a topic question."""
    found = re.search(r"`([^`]+)`", question)
    return found.group(1) if found else ""


def _scopes(name: str) -> list[str]:
    """Dotted prefixes from the nearest to the whole category: 'a.b.c' -> ['a.b', 'a', '']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)] + [""]


def _split_answer(answer: str, name: str, category: str) -> tuple[str | None, str]:
    """(parameters, documentation) of an object's answer, whose last line is its signature (`with_signature`);
    (None, answer) for a module or topic answer, or one without that line."""
    body, signature = split_signature(answer)
    if category in OBJECT_CATEGORIES and signature.startswith(name):
        return signature[len(name) :], body
    return None, answer


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def _items(records: list[dict]) -> list[dict]:
    items = []
    for rec in records:
        question, answer = rec["messages"][1]["content"], rec["messages"][2]["content"]
        name = _name(question) if rec["category"] != "topic" else ""
        params, body = _split_answer(answer, name, rec["category"])
        words = set(body.lower().split())
        items.append({"rec": rec, "name": name, "params": params, "body": body, "words": words})
    return items


def _searches(item: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(scope, categories) to look for a neighbour in, nearest first: the same category before another
    kind of object of the same scope, and the whole category last."""
    category = item["rec"]["category"]
    if category not in OBJECT_CATEGORIES:
        return [(scope, (category,)) for scope in _scopes(item["name"])]
    *named, _ = _scopes(item["name"])
    return [s for scope in named for s in ((scope, (category,)), (scope, OBJECT_CATEGORIES))] + [("", (category,))]


def _neighbour(item: dict, items: list[dict], rng: random.Random) -> dict | None:
    for scope, categories in _searches(item):
        near = [
            other
            for other in items
            if other is not item
            and other["rec"]["category"] in categories
            and (not scope or other["name"].startswith(scope + "."))
            and _overlap(other["words"], item["words"]) < MAX_OVERLAP
        ]
        if near:
            return rng.choice(near)
    return None


def _wrong_answer(item: dict, other: dict) -> str:
    """The neighbour's answer; an object's signature line names the asked object with the neighbour's parameters."""
    if other["params"] is None:
        return other["body"]
    return with_signature(other["body"], f"{item['name']}{other['params']}")


def build_sample_preferences(seed: int = 42, eval_ratio: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, holdout) pairs: one per sample question that has a neighbour, in the sample set's order.

    The questions are split first (as `qlora prepare --sample` splits them) and each side draws its
    wrong answers from its own side only: a training pair that pushed a holdout question's right
    answer down as a rejected one would teach the model against the holdout."""
    train, holdout = split_holdout(build_sample_records(), eval_ratio, seed)
    return _pairs(_items(train), seed), _pairs(_items(holdout), seed)


def _pairs(items: list[dict], seed: int) -> list[dict]:
    pairs = []
    for item in items:
        messages = item["rec"]["messages"]
        other = _neighbour(item, items, random.Random(f"{seed}:{messages[1]['content']}"))
        if other is None:
            continue
        pairs.append(
            {
                "prompt": messages[:-1],
                "chosen": messages[-1]["content"],
                "rejected": _wrong_answer(item, other),
                "category": item["rec"]["category"],
            }
        )
    return pairs
