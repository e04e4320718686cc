"""Tool records: both input shapes, the schema checks, rendering and labels, parsing calls back."""

import copy
import json

import pytest

from qlora_platform.data.formats import answer_of, to_chat_record
from qlora_platform.data.prepare import prepare
from qlora_platform.data.tokenize import IGNORE, encode_record
from qlora_platform.data.tools import (
    call_error,
    calls_equal,
    could_start_call,
    normalise_tools,
    parse_tool_calls,
    platform_messages,
    renders_tools,
    template_inputs,
    tools_by_name,
)
from qlora_platform.data.tools_sample import build_sample_tool_records
from qlora_platform.data.validate import validate_file
from qlora_platform.errors import UserError

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}


def openai_record(arguments='{"a": 2, "b": 3}', result=True) -> dict:
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": arguments}}],
        },
    ]
    if result:
        messages += [
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "assistant", "content": "2 + 3 = 5."},
        ]
    return {"tools": [ADD], "messages": messages}


def test_openai_record_is_normalised_with_arguments_as_an_object():
    rec = to_chat_record(openai_record(), "t.jsonl:1")
    assert rec["tools"] == [ADD]
    call = rec["messages"][1]
    assert call == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
    }
    assert rec["messages"][2] == {"role": "tool", "content": "5", "tool_call_id": "c1", "name": "add"}
    assert answer_of(rec) == '{"arguments": {"a": 2, "b": 3}, "name": "add"}\n2 + 3 = 5.'


def test_llama_factory_sharegpt_record_becomes_the_same_shape():
    record = {
        "conversations": [
            {"from": "human", "value": "What is 2 + 3?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
            {"from": "observation", "value": "5"},
            {"from": "gpt", "value": "2 + 3 = 5."},
        ],
        "tools": json.dumps([ADD["function"]]),
        "system": "Be exact.",
    }
    rec = to_chat_record(record, "t.jsonl:1")
    expected = to_chat_record(openai_record(), "t.jsonl:1")
    assert rec["tools"] == expected["tools"]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert rec["messages"][2]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert rec["messages"][3]["tool_call_id"] == rec["messages"][2]["tool_calls"][0]["id"]


def test_parallel_calls_get_their_results_from_a_json_list_observation():
    record = {
        "conversations": [
            {"from": "human", "value": "2 + 3 and 4 + 5?"},
            {
                "from": "function_call",
                "value": json.dumps([{"name": "add", "arguments": {"a": a, "b": b}} for a, b in ((2, 3), (4, 5))]),
            },
            {"from": "observation", "value": "[5, 9]"},
            {"from": "gpt", "value": "5 and 9."},
        ],
        "tools": [ADD],
    }
    rec = to_chat_record(record, "t.jsonl:1")
    assert [m["content"] for m in rec["messages"] if m["role"] == "tool"] == ["5", "9"]


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="mul"),
            "'mul', which is not a declared tool",
        ),
        (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments='{"a": 2}'), "'b' is a required"),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments='{"a": "two", "b": 3}'),
            r"arguments\.a: 'two' is not of type 'number'",
        ),
        (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{a: 2"), "not JSON"),
        (lambda r: r["messages"].pop(2), "have no tool result; every call gets its result before the next turn"),
        (lambda r: r["messages"][2].update(tool_call_id="c9"), "'c9' names no call waiting"),
        (lambda r: r["messages"].insert(1, {"role": "tool", "content": "5"}), "a tool result with no call before it"),
        (
            lambda r: r["tools"][0]["function"]["parameters"]["properties"]["a"].update(type="numbr"),
            r"tools\.0\.function\.parameters\.properties\.a\.type",
        ),
        (lambda r: r["tools"].append(ADD), "'add' is declared twice"),
        (lambda r: r["tools"][0]["function"].update(name="add numbers"), r"tools\.0\.function\.name must be"),
    ],
)
def test_bad_tool_records_name_the_line_and_the_problem(change, message):
    record = copy.deepcopy(openai_record())
    change(record)
    with pytest.raises(UserError, match=message) as err:
        to_chat_record(record, "t.jsonl:7")
    assert str(err.value).startswith("t.jsonl:7")


def test_a_record_may_end_at_the_call():
    rec = to_chat_record(openai_record(result=False), "t.jsonl:1")
    assert rec["messages"][-1]["tool_calls"]


def test_platform_format_renders_calls_and_results_and_labels_calls_and_answers(tokenizer):
    assert not renders_tools(tokenizer)  # the bundled SmolLM2 template knows no tools
    rec = to_chat_record(openai_record(), "t.jsonl:1")
    ex = encode_record(tokenizer, rec, 10_000)
    text = tokenizer.decode(ex["input_ids"])
    assert "<tools>\n" + json.dumps(ADD["function"], separators=(",", ":")) + "\n</tools>" in text
    labelled = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert labelled == f"{call}<|im_end|>2 + 3 = 5.<|im_end|>"
    assert "<tool_response>\n5\n</tool_response>" in text and "tool_response" not in labelled


def test_platform_messages_merge_consecutive_results_into_one_user_turn():
    rec = to_chat_record(
        {
            "tools": [ADD],
            "messages": [
                {"role": "system", "content": "Be exact."},
                {"role": "user", "content": "2 + 3 and 4 + 5?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": "x", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
                        {"id": "y", "function": {"name": "add", "arguments": {"a": 4, "b": 5}}},
                    ],
                },
                {"role": "tool", "tool_call_id": "y", "content": "9"},
                {"role": "tool", "tool_call_id": "x", "content": "5"},
                {"role": "assistant", "content": "5 and 9."},
            ],
        },
        "t.jsonl:1",
    )
    view = platform_messages(rec["messages"], rec["tools"])
    assert [m["role"] for m in view] == ["system", "user", "assistant", "user", "assistant"]
    assert view[0]["content"].startswith("Be exact.\n\nYou may call these functions:")
    assert view[3]["content"] == "<tool_response>\n9\n</tool_response>\n<tool_response>\n5\n</tool_response>"


NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_a_template_that_renders_tools_gets_them_as_they_are(tokenizer):
    native = copy.copy(tokenizer)
    native.chat_template = NATIVE_TEMPLATE
    assert renders_tools(native)
    rec = to_chat_record(openai_record(), "t.jsonl:1")
    messages, tools = template_inputs(native, rec["messages"], rec["tools"])
    assert tools == rec["tools"] and [m["content"] for m in messages] == [m["content"] for m in rec["messages"]]
    # Ids become 9 letters or digits (Mistral's templates take no others), the same for a call and its result.
    assert messages[1]["tool_calls"][0]["id"] == messages[2]["tool_call_id"] == "call00000"
    assert rec["messages"][1]["tool_calls"][0]["id"] == "c1"
    ex = encode_record(native, rec, 10_000)
    text = native.decode(ex["input_ids"])
    assert text.startswith("TOOLS:add;user: What is 2 + 3?")
    labelled = native.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    # The space after 'assistant:' merges into the word CALL (digits stand alone), and that token is labelled.
    assert labelled == ' CALL add {"a": 2, "b": 3}<|im_end|>2 + 3 = 5.<|im_end|>'


@pytest.mark.parametrize(
    "text,content,calls,errors",
    [
        (
            '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
            "",
            [("add", {"a": 2, "b": 3})],
            0,
        ),
        ('Let me add.\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}', "Let me add.", [("add", {"a": 1})], 0),
        (
            '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]</tool_call>',
            "",
            [("a", {}), ("b", {})],
            0,
        ),
        ('<tool_call>{"name": "add", "arguments": {"a": 2</tool_call> ok', "ok", [], 1),
        ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]', "", [("add", {"a": 1, "b": 2})], 0),
        ('{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})], 0),
        ('{"name": "Ada"}', '{"name": "Ada"}', [], 0),
        ("2 + 3 is 5.", "2 + 3 is 5.", [], 0),
    ],
)
def test_calls_are_parsed_back_from_text(text, content, calls, errors):
    parsed = parse_tool_calls(text)
    assert parsed.content == content
    assert [(c["name"], c["arguments"]) for c in parsed.calls] == calls
    assert len(parsed.errors) == errors


def test_call_checks_and_structural_equality():
    declared = tools_by_name(normalise_tools([ADD], "x"))
    assert call_error("add", {"a": 1, "b": 2.5}, declared) is None
    assert "not a declared tool (declared: add)" in call_error("sub", {}, declared)
    assert "must be a JSON object" in call_error("add", "1, 2", declared)
    assert calls_equal(
        [{"name": "add", "arguments": {"a": 2, "b": 3}}], [{"name": "add", "arguments": {"b": 3.0, "a": 2}}]
    )
    assert not calls_equal(
        [{"name": "add", "arguments": {"a": 2, "b": 3}}], [{"name": "add", "arguments": {"a": 3, "b": 2}}]
    )
    two = [{"name": "add", "arguments": {"a": 1, "b": 1}}, {"name": "add", "arguments": {"a": 2, "b": 2}}]
    assert calls_equal(two, two[::-1]) and not calls_equal(two, two[:1])


def test_streamed_text_is_held_where_a_call_may_begin():
    assert could_start_call("The answer is 5.") == -1
    assert could_start_call("Let me check <tool_") == len("Let me check ")
    assert could_start_call("ok <tool_call>{") == 3
    assert could_start_call('  {"name"') == 2
    assert could_start_call("[TOOL") == 0


def test_sample_tool_set_is_seeded_valid_and_mixed():
    records = build_sample_tool_records(seed=3, count=80)
    assert records == build_sample_tool_records(seed=3, count=80)
    kinds = {r["category"] for r in records}
    assert kinds == {"lookup_docs", "calculate", "convert_units", "no_tool"}
    for i, raw in enumerate(records):
        rec = to_chat_record(json.loads(json.dumps(raw)), f"sample:{i}")
        tool_msgs = [m for m in rec["messages"] if m["role"] == "tool"]
        if rec["messages"][1].get("tool_calls") and tool_msgs:
            call = rec["messages"][1]["tool_calls"][0]["function"]
            if call["name"] == "calculate":
                a, b = call["arguments"]["a"], call["arguments"]["b"]
                want = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b}[
                    call["arguments"]["operation"]
                ]
                assert float(tool_msgs[0]["content"]) == pytest.approx(want, rel=1e-3, abs=1e-4)


def test_prepare_sample_tools_writes_a_split_set_that_validates(tmp_path, tokenizer):
    report = prepare([], out_dir=tmp_path, sample_tools=True)
    assert report["inputs"] == ["sample:tools"] and report["eval"] > 0 and report["kind"] == "sft"
    with pytest.raises(UserError, match="separate data sets"):
        prepare([], out_dir=tmp_path, sample=True, sample_tools=True)
    checked = validate_file(tmp_path / "train.jsonl", tokenizer, 512, eval_path=tmp_path / "eval.jsonl")
    assert checked.ok, checked.format()


def test_validate_names_the_line_of_a_bad_call_and_skips_the_length_warning(tmp_path, tokenizer):
    good = to_chat_record(openai_record(), "x")
    bad = openai_record(arguments='{"a": 2, "b": "three"}')
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good | {"id": "2"})))
    report = validate_file(path, tokenizer, 512)
    assert not report.ok
    assert report.errors[0].startswith(f"{path}:2: message 1: tool call 0 the arguments of 'add' do not fit")
    assert "b: 'three' is not of type 'number'" in report.errors[0]
    assert not any("answers average" in w for w in report.warnings)


def test_a_ref_that_does_not_resolve_and_a_name_that_is_not_a_string_are_one_line_each():
    broken = copy.deepcopy(ADD)
    broken["function"]["parameters"]["properties"]["a"] = {"$ref": "#/$defs/nope"}
    with pytest.raises(UserError, match=r"t:1: tools\.0\.function\.parameters\.properties\.a\.\$ref: '#/\$defs/nope'"):
        normalise_tools([broken], "t:1")
    local = copy.deepcopy(ADD)
    local["function"]["parameters"]["$defs"] = {"num": {"type": "number"}}
    local["function"]["parameters"]["properties"]["a"] = {"$ref": "#/$defs/num"}
    declared = tools_by_name(normalise_tools([local], "t:1"))
    assert call_error("add", {"a": 1, "b": 2}, declared) is None
    assert "arguments.a: 'x' is not of type 'number'" in call_error("add", {"a": "x", "b": 2}, declared)
    assert "function.name must be a string" in call_error(["add"], {}, declared)
    record = openai_record()
    record["messages"][1]["tool_calls"][0]["function"]["name"] = ["add"]
    with pytest.raises(UserError, match="function.name \\(a string\\)"):
        to_chat_record(record, "t:1")
    typo = copy.deepcopy(ADD)
    typo["function"]["parameters"]["properties"]["a"]["type"] = "numbr"
    with pytest.raises(UserError, match="types: string, number, integer"):
        normalise_tools([typo], "t:1")


def test_a_closing_tag_inside_an_argument_string_does_not_cut_the_call():
    text = '<tool_call>{"name": "echo", "arguments": {"text": "a </tool_call> b"}}</tool_call> done'
    parsed = parse_tool_calls(text)
    assert parsed.calls == [{"name": "echo", "arguments": {"text": "a </tool_call> b"}}]
    assert parsed.content == "done" and not parsed.errors
    around = parse_tool_calls('Hi <tool_call>{"name": "f", "arguments": {}}</tool_call> bye')
    assert around.content == "Hi bye"
