import json

import pytest

from qlora_platform.data.formats import iter_jsonl, to_chat_record
from qlora_platform.errors import UserError


def test_alpaca_with_input_and_system():
    rec = to_chat_record({"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be terse."}, "x:1")
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][1]["content"] == "Sum\n\n1 2"


def test_sharegpt_roles_are_mapped():
    rec = to_chat_record(
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "yo"},
                {"from": "human", "value": "more"},
                {"from": "gpt", "value": "ok"},
            ]
        },
        "x:1",
    )
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "user", "assistant"]


def test_messages_prompt_completion_and_text():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_chat_record({"messages": msgs, "category": "c"}, "x:1") == {"messages": msgs, "category": "c"}
    assert to_chat_record({"prompt": "q", "completion": "a"}, "x:1")["messages"] == msgs
    assert to_chat_record({"text": "plain"}, "x:1") == {"text": "plain"}


@pytest.mark.parametrize(
    "record,message",
    [
        ({"instruction": "q"}, "x.jsonl:3: missing field 'output'"),
        ({"instruction": "q", "output": "   "}, "x.jsonl:3: assistant message 1 is empty or whitespace"),
        ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "role 'robot'"),
        ({"conversations": [{"from": "alien", "value": "q"}]}, "from 'alien'"),
        ({"question": "q", "answer": "a"}, "unknown record format"),
        ({"instruction": 3, "output": "a"}, "instruction must be a string"),
    ],
)
def test_bad_records_name_file_line_and_problem(record, message):
    with pytest.raises(UserError, match=message):
        to_chat_record(record, "x.jsonl:3")


def test_malformed_jsonl_line_reports_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n{not json}\n")
    with pytest.raises(UserError, match=r"d.jsonl:3: malformed JSON"):
        list(iter_jsonl(path))
