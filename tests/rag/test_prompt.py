"""Passages into the prompt: numbered before the question, best first within the budget and the context."""

from __future__ import annotations

from qlora_platform.rag.prompt import INSTRUCTION, fit_passages, format_sources, grounded, question_of
from qlora_platform.rag.retrieve import Passage


def passage(n: int, words: int = 10) -> Passage:
    return Passage(" ".join(["w"] * words), f"docs/{n}.md", f"H{n}", "T", 1.0 / n)


def fake_encode(messages: list[dict]) -> list[int]:
    return [0] * sum(len(m["content"].split()) for m in messages)


def test_the_last_user_message_carries_the_passages():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "What is H1?"},
    ]
    out = grounded(messages, [passage(1, 2), passage(2, 2)])
    assert out[:3] == messages[:3] and messages[3]["content"] == "What is H1?"
    assert (
        out[3]["content"]
        == f"{INSTRUCTION}\n\n[1] docs/1.md § H1\nw w\n\n[2] docs/2.md § H2\nw w\n\nQuestion: What is H1?"
    )
    assert question_of(messages) == "What is H1?"


def test_passages_fit_the_budget_then_the_context():
    messages = [{"role": "user", "content": "q"}]
    passages = [passage(n) for n in range(1, 5)]
    count = lambda s: len(s.split())  # noqa: E731 - a word a token
    # Each block is 4 + 10 words: the budget of 30 takes two.
    ids, used = fit_passages(fake_encode, messages, passages, 5, 10_000, 30, count)
    assert [p.heading for p in used] == ["H1", "H2"]
    # A context that holds the question and one passage drops the second.
    one = len(fake_encode(grounded(messages, passages[:1])))
    ids, used = fit_passages(fake_encode, messages, passages, 5, one + 5, 1000, count)
    assert [p.heading for p in used] == ["H1"] and len(ids) == one
    # None fits: the plain conversation.
    ids, used = fit_passages(fake_encode, messages, passages, 5, 7, 1000, count)
    assert used == [] and len(ids) == 1


def test_sources_are_listed_by_number():
    assert (
        format_sources([passage(1), passage(2)])
        == "sources:\n  [1] docs/1.md § H1 (1.000)\n  [2] docs/2.md § H2 (0.500)"
    )
    assert format_sources([]).startswith("sources: none")
