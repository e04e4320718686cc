"""Keyword scoring and the validation of users' benchmark prompt files."""

from __future__ import annotations

import json

import pytest

from qlora_platform.errors import UserError
from qlora_platform.eval.keywords import DEFAULT_PROMPTS, BenchmarkPrompt, keyword_hit, load_prompt_file, score_answer


def test_keywords_match_case_insensitive_whole_words_and_alternatives():
    assert keyword_hit("It returns a STRING.", "string")
    assert not keyword_hit("It returns a string.", "str")  # whole words only
    assert keyword_hit("Serialize obj to a JSON str", ["string", "str"])
    assert keyword_hit("see json.dumps(obj)", "json.dumps")
    assert keyword_hit("keys like '/' are", "'/'")  # punctuation edges match anywhere
    assert not keyword_hit("jsonxdumps", "json.dumps")  # the dot is literal


def test_score_counts_hits_against_the_needed_number():
    p = BenchmarkPrompt(prompt="q", keywords=["alpha", ["beta", "b"], "gamma"])
    assert p.needed == 2  # half of 3, rounded up
    s = score_answer("Alpha and b.", p)
    assert s["hits"] == ["alpha", "b"] and s["missed"] == ["gamma"] and s["passed"]
    assert not score_answer("only gamma", p)["passed"]
    strict = BenchmarkPrompt(prompt="q", keywords=["alpha", "gamma"], min_hits=2)
    assert not score_answer("alpha", strict)["passed"] and score_answer("gamma alpha", strict)["passed"]


def test_the_shipped_prompt_file_is_valid_and_large_enough():
    bench = load_prompt_file(DEFAULT_PROMPTS)
    assert len(bench.prompts) >= 20 and len({p.id for p in bench.prompts}) == len(bench.prompts)
    assert bench.system and bench.generation.max_new_tokens > 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON: .* line 1"),
        ('"a string"', "must hold an object"),
        ('{"prompts": []}', r"prompts: List should have at least 1 item"),
        ('{"prompts": [{"prompt": "q"}]}', r"prompts\[0\]\.keywords: Field required"),
        ('{"prompts": [{"prompt": "q", "keywords": []}]}', r"prompts\[0\]\.keywords: List should have at least 1"),
        ('{"prompts": [{"prompt": "  ", "keywords": ["a"]}]}', r"prompts\[0\]\.prompt: is blank"),
        ('{"prompts": [{"prompt": "q", "keywords": ["a", ""]}]}', "non-empty string"),
        ('{"prompts": [{"prompt": "q", "keywords": ["a"], "min_hits": 2}]}', "min_hits is 2 but there are only 1"),
        ('{"prompts": [{"prompt": "q", "keywords": ["a"], "answer": "x"}]}', r"prompts\[0\]\.answer: unknown field"),
        (
            '[{"id": "x", "prompt": "q", "keywords": ["a"]}, {"id": "x", "prompt": "r", "keywords": ["b"]}]',
            "duplicate prompt id 'x'",
        ),
        (
            '{"generation": {"max_new_tokens": 0}, "prompts": [{"prompt": "q", "keywords": ["a"]}]}',
            r"generation\.max_new_tokens",
        ),
    ],
)
def test_bad_prompt_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_prompt_file(path)
    assert str(path) in str(err.value)


def test_missing_prompt_file_names_the_default(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass --prompts FILE"):
        load_prompt_file(tmp_path / "nope.json")


def test_a_plain_list_of_prompts_is_accepted(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "q1", "keywords": ["a"]}, {"prompt": "q2", "keywords": [["b", "c"]]}]))
    bench = load_prompt_file(path)
    assert [p.id for p in bench.prompts] == ["prompt-1", "prompt-2"]
