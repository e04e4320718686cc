from qlora_platform.demo import format_side_by_side, side_by_side


def _row(i: int, passed: bool) -> dict:
    side = {"answer": f" answer {i} ", "hits": ["JSON"] if passed else [], "hit_count": int(passed), "needed": 1}
    return {
        "position": i + 1,
        "prompt": f"question {i}?",
        "keywords": ["JSON", "str | string"],
        "base": {**side, "passed": False, "hits": [], "hit_count": 0},
        "tuned": {**side, "passed": passed},
    }


def test_side_by_side_takes_evenly_spaced_prompts_in_file_order_whatever_the_answers():
    rows = [_row(i, passed=i % 3 == 0) for i in range(26)]
    shown = side_by_side(rows)
    assert [r["position"] for r in shown] == [1, 7, 14, 20]
    flipped = [_row(i, passed=i % 3 != 0) for i in range(26)]
    assert [r["position"] for r in side_by_side(flipped)] == [1, 7, 14, 20]  # the answers do not choose
    assert [r["position"] for r in side_by_side(rows[:3])] == [1, 2, 3]


def test_side_by_side_text_states_the_rule_and_each_sides_keyword_hits():
    rows = [_row(i, passed=True) for i in range(8)]
    text = format_side_by_side(side_by_side(rows), total=8)
    assert text.startswith("Side by side: 4 of the 8 benchmark prompts, evenly spaced")
    assert "(prompts 1, 3, 5, 7; a fixed rule" in text
    assert "[1/4] Q: question 0?" in text and "keywords: JSON; str | string" in text
    assert "--- base model: 0 of 2 keywords (1 needed): fail; found: none" in text
    assert "--- tuned model: 1 of 2 keywords (1 needed): pass; found: JSON" in text
    assert "\nanswer 0\n" in text
