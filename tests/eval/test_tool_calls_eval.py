"""Tool-call metrics against hand-computed values, through `tool_call_scores` with a scripted engine."""

import contextlib
import json
from types import SimpleNamespace

from qlora_platform.eval.report import render_markdown
from qlora_platform.eval.tools import decisions, judge, summarise, tool_call_scores, tool_calls_markdown
from tests.data.test_tools import ADD


def _record(question: str, call: dict | None, answer: str = "") -> dict:
    if call is None:
        reply = {"role": "assistant", "content": answer}
    else:
        reply = {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": call}]}
    return {"tools": [ADD], "messages": [{"role": "user", "content": question}, reply]}


def _call(a, b) -> str:
    return f"<tool_call>\n{json.dumps({'name': 'add', 'arguments': {'a': a, 'b': b}})}\n</tool_call>"


RECORDS = [
    _record("2 + 3?", {"name": "add", "arguments": {"a": 2, "b": 3}}),
    _record("4 + 5?", {"name": "add", "arguments": {"a": 4, "b": 5}}),
    _record("6 + 7?", {"name": "add", "arguments": {"a": 6, "b": 7}}),
    _record("8 + 9?", {"name": "add", "arguments": {"a": 8, "b": 9}}),
    _record("Hi!", None, "Hello!"),
    _record("Thanks!", None, "You're welcome."),
]
# Per decision: (text, exact, right function, valid, abstained).
TUNED = [
    (_call(2, 3), True, True, True, False),
    (_call(5.0, 4.0).replace('"a": 5.0, "b": 4.0', '"b": 5.0, "a": 4.0'), True, True, True, False),  # key order, 4.0
    (_call(6, 8), False, True, True, False),  # wrong argument
    ('<tool_call>{"name": "sub", "arguments": {"a": 8, "b": 9}}</tool_call>', False, False, False, False),
    ("Hello!", False, False, False, True),
    (_call(1, 1), False, False, True, False),  # a call where none is needed: "right function" counts call turns only
]
BASE = [
    ('<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>', False, True, False, False),  # misses b
    ("9", False, False, False, True),
    ('<tool_call>{"name": "add", "arguments": {"a": 6, "b": 7}}', True, True, True, False),  # unclosed at EOS
    ("<tool_call>add(8, 9)</tool_call>", False, False, False, False),  # does not parse
    ("Hi.", False, False, False, True),
    ("<tool_call>oops", False, False, False, False),  # an attempt is not an abstention
]


def test_each_verdict_matches_the_hand_judgement():
    todo = decisions(RECORDS)
    for (text, exact, right, valid, abstained), d in zip(TUNED + BASE, todo + todo):
        v = judge(text, d)
        assert (v["exact_match"], v["right_function"], v["valid"], v["abstained"]) == (
            exact,
            right,
            valid,
            abstained,
        ), text


def test_rates_are_counted_over_the_turns_of_their_kind():
    todo = decisions(RECORDS)
    tuned = summarise([judge(t[0], d) for t, d in zip(TUNED, todo)], todo)
    assert tuned == {"exact_match": 0.5, "right_function": 0.75, "valid_call_rate": 0.75, "abstention": 0.5}
    base = summarise([judge(t[0], d) for t, d in zip(BASE, todo)], todo)
    assert base == {"exact_match": 0.25, "right_function": 0.5, "valid_call_rate": 0.25, "abstention": 0.5}


class ScriptedEngine:
    """Answers with the base or tuned script, as the adapter switch says."""

    def __init__(self):
        self.base = False
        self.prompts = []

    @staticmethod
    def tokenizer(text, add_special_tokens=True):
        return {"input_ids": text.split()}  # a word a token: the reference call is 9 of them

    def encode_chat(self, messages, tools=None):
        self.prompts.append((messages, tools))
        return [len(self.prompts) - 1]

    def generate(self, prompts, params):
        script = BASE if self.base else TUNED
        return [SimpleNamespace(text=script[p[0] % len(RECORDS)][0]) for p in prompts]


def test_tool_call_scores_runs_both_sides_and_writes_its_section(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    engine = ScriptedEngine()

    @contextlib.contextmanager
    def base_only():
        engine.base = True
        yield
        engine.base = False

    loaded = SimpleNamespace(engine=engine, base_only=base_only)
    scores = tool_call_scores(loaded, str(eval_file), batch_size=4, log=lambda *_: None)
    assert scores["exact_match"] == {"base": 0.25, "tuned": 0.5}
    assert scores["abstention"] == {"base": 0.5, "tuned": 0.5}
    assert (scores["decisions"], scores["need_call"], scores["need_text"]) == (6, 4, 2)
    assert scores["max_new_tokens"] == 32  # 9 + 16 is under the floor
    assert engine.prompts[0] == ([{"role": "user", "content": "2 + 3?"}], [ADD])
    # Decisions where base and tuned differ come first among the examples.
    assert [ex["prompt"] for ex in scores["examples"]] == ["2 + 3?", "4 + 5?", "6 + 7?", "8 + 9?", "Hi!", "Thanks!"]
    assert [(ex["base_right"], ex["tuned_right"]) for ex in scores["examples"][2:5]] == [
        (True, False),
        (False, False),
        (True, True),
    ]
    md = "\n".join(tool_calls_markdown(scores))
    assert "| exact_match | 25.0% | 50.0% |" in md and "| abstention | 50.0% | 50.0% |" in md

    no_tools = tmp_path / "plain.jsonl"
    no_tools.write_text(json.dumps({"messages": RECORDS[4]["messages"]}) + "\n")
    assert tool_call_scores(loaded, str(no_tools), log=lambda *_: None) is None


def test_the_report_shows_the_tool_section():
    todo = decisions(RECORDS)
    verdicts = [judge(t[0], d) for t, d in zip(TUNED, todo)]
    section = summarise(verdicts, todo)
    scores = {m: {"base": 0.0, "tuned": section[m]} for m in section}
    scores.update(decisions=6, need_call=4, need_text=2, eval_file="e.jsonl", max_new_tokens=96, examples=[])
    scores["definitions"] = {m: m for m in section}
    report = {
        "model": "m",
        "adapter": "a",
        "device": "cpu",
        "weights": "4-bit NF4",
        "created": "now",
        "command": "qlora eval",
        "keyword_pass_rate": {"base": 0.0, "tuned": 0.0},
        "keyword_benchmark": {
            "base_passed": 0,
            "tuned_passed": 0,
            "prompts": 0,
            "file": "f",
            "name": "n",
            "generation": {"max_new_tokens": 8, "repetition_penalty": 1.0},
        },
        "speed": {
            "prefill_tokens_per_s": 1.0,
            "decode_tokens_per_s": 1.0,
            "ttft_ms": 1.0,
            "peak_memory_gib": 1.0,
            "peak_memory_kind": "RSS",
            "device": "cpu",
            "runs": 1,
            "prompt_tokens": 1,
            "new_tokens": 1,
        },
        "prompts": [],
        "samples_shown": 0,
        "plots": [],
        "tool_calls": scores,
    }
    assert "## Tool calls" in render_markdown(report)
