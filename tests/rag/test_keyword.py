"""BM25 terms, ranking and reciprocal rank fusion, with hand-checked values."""

from __future__ import annotations

import pytest

from qlora_platform.rag.keyword import KeywordIndex, fuse, terms


def test_dotted_and_hyphenated_names_count_whole_and_by_parts():
    assert terms("What does `json.dumps` do?") == ["json.dumps", "json", "dumps"]
    assert terms("--document-private-items, move_to_end") == [
        "document-private-items",
        "document",
        "private",
        "items",
        "move_to_end",
    ]


def test_a_named_section_ranks_before_its_neighbours():
    index = KeywordIndex(
        [
            ("json.dump", "Serialize obj as a JSON formatted stream to fp."),
            ("json.dumps", "Serialize obj to a JSON formatted str."),
            ("json.loads", "Deserialize s to a Python object."),
            ("os.path.join", "Join one or more path segments."),
        ]
    )
    ranked = index.search(["What does json.dumps do?", "zzz", ""], 4)
    assert ranked[0][0][0] == 1  # the exact name wins over the other json sections
    assert {row for row, _ in ranked[0]} == {0, 1, 2}  # os.path.join shares no term: not returned
    assert ranked[1] == [] and ranked[2] == []


def test_reciprocal_rank_fusion():
    fused = fuse([[3, 1, 2], [1, 4]])
    assert [row for row, _ in fused] == [1, 3, 4, 2]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][1] == pytest.approx(1 / 61)
