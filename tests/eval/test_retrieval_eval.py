"""Retrieval metrics of `qlora eval --rag`: known-source questions, hits, hit@k / MRR against
hand-computed values with a scripted retriever, and the report's tables."""

from __future__ import annotations

import json

import pytest

from qlora_platform.eval.retrieval import is_hit, known_sources, retrieval_hits, retrieval_markdown
from qlora_platform.rag.prompt import Grounding
from qlora_platform.rag.retrieve import Passage
from qlora_platform.rag.settings import RagSettings


def p(source: str, heading: str) -> Passage:
    return Passage("text", source, heading, "", 1.0)


def test_a_hit_is_the_file_and_the_heading():
    assert is_hit(p("data/docs/json.html", "json.dumps"), "json.html#json.dumps")
    assert is_hit(p("C:\\docs\\json.html", "json.dumps"), "docs/json.html#json.dumps")
    assert not is_hit(p("data/docs/xjson.html", "json.dumps"), "json.html#json.dumps")
    assert not is_hit(p("data/docs/json.html", "json.dump"), "json.html#json.dumps")
    assert is_hit(p("t.html", 'The "assert" statement'), 't.html#The  "assert"   statement')


def test_known_sources_are_chat_records_with_file_and_heading(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}], "source": "a.md#H"},
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A"}], "source": "a.md"},
        {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A"}]},
        {"text": "plain", "source": "b.md#X"},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert known_sources(str(path)) == [("Q1", "a.md#H")]


class Scripted:
    """A retriever that answers from a table: question -> headings, best first, per mode."""

    def __init__(self, table):
        self.table = table

    def search(self, questions, k, mode="hybrid"):
        return [[p("d/f.md", h) for h in self.table[mode][q][:k]] for q in questions]

    def describe(self):
        return "scripted"


def test_hits_and_mrr_by_mode(tmp_path):
    path = tmp_path / "eval.jsonl"
    qa = [("q1", "A"), ("q2", "B"), ("q3", "C")]
    path.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}],
                    "source": f"f.md#{h}",
                }
            )
            for q, h in qa
        )
    )
    ranked = {"q1": ["A", "Z"], "q2": ["Z", "Y", "B"], "q3": ["Z", "Y", "X"]}
    table = {"hybrid": ranked, "vector": {q: ["A", "B", "C"] for q in ranked}, "keyword": {q: [] for q in ranked}}
    grounding = Grounding(Scripted(table), RagSettings(k=3))
    hits = retrieval_hits(grounding, str(path), log=lambda *a: None)
    assert hits["hybrid"] == {
        "hit_at_1": pytest.approx(1 / 3),
        "hit_at_3": pytest.approx(2 / 3),
        "mrr": pytest.approx((1 + 1 / 3) / 3),
    }
    assert hits["vector"] == {
        "hit_at_1": pytest.approx(1 / 3),
        "hit_at_3": 1.0,
        "mrr": pytest.approx((1 + 1 / 2 + 1 / 3) / 3),
    }
    assert hits["keyword"] == {"hit_at_1": 0.0, "hit_at_3": 0.0, "mrr": 0.0}
    assert hits["misses"] == [
        {"question": "q3", "source": "f.md#C", "found": ["d/f.md § Z", "d/f.md § Y", "d/f.md § X"]}
    ]
    md = "\n".join(
        retrieval_markdown(
            {
                "index": "scripted",
                "k": 3,
                "mode": "hybrid",
                "budget": 768,
                "hits": hits,
                "keyword_pass_rate": {"base": {"without": 0.25, "with": 0.5}, "tuned": {"without": 0.5, "with": 0.75}},
                "prompts": 4,
                "passages_per_prompt": 2.5,
            }
        )
    )
    assert "| hybrid (used) | 0.333 | 0.667 | 0.444 |" in md and "| vector | 0.333 | 1.000 | 0.611 |" in md
    assert "| base | 25.0% (1/4) | 50.0% (2/4) |" in md and "| tuned | 50.0% (2/4) | 75.0% (3/4) |" in md
    assert "- missed: q3 (`f.md#C`" in md


def test_no_known_source_is_said(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    said = []
    assert retrieval_hits(Grounding(Scripted({}), RagSettings()), str(path), log=said.append) is None
    assert "names its source" in said[0]
