"""OpenAI `tools` over the real server with the bundled model, through the `openai` SDK: forced calls
(whole and streamed), a follow-up with the call's result, and refused schemas. The bundled model is not
trained on tools, so these check the protocol's contract, not the model's aim: an answer is either
calls that parse and fit their schema (finish_reason "tool_calls") or text with `tool_call_error`."""

from __future__ import annotations

import json

import pytest
import requests
from jsonschema import validate

from qlora_platform.data.tools_sample import TOOLS as SAMPLE_TOOLS
from tests.infer.conftest import KEY

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "What is 2 plus 3? Use the calculator."}]
TOOLS = [next(t for t in SAMPLE_TOOLS if t["function"]["name"] == "calculate")]
PARAMETERS = TOOLS[0]["function"]["parameters"]
FORCED = {"type": "function", "function": {"name": "calculate"}}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY)


def check_contract(finish_reason: str, calls: list[tuple[str, str]], content: str | None, error: str | None) -> None:
    """Calls that parse and fit, or the answer as text with the reason."""
    if finish_reason == "tool_calls":
        assert calls and error is None
        for name, arguments in calls:
            assert name == "calculate"
            validate(json.loads(arguments), PARAMETERS)
    else:
        assert finish_reason in ("stop", "length") and not calls
        assert error and content and content.startswith('<tool_call>\n{"name": "calculate", "arguments":')


def test_a_forced_call_is_a_valid_call_or_text_with_the_reason(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=FORCED, max_tokens=48, temperature=0
    )
    choice = reply.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    error = (choice.model_extra or {}).get("tool_call_error")
    check_contract(choice.finish_reason, calls, choice.message.content, error)
    print(f"\nforced call: {choice.finish_reason}: {calls or error}")

    stream = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=FORCED, max_tokens=48, temperature=0, stream=True
    )
    content, streamed, finish, streamed_error = "", {}, None, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = streamed.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
            streamed_error = (chunk.choices[0].model_extra or {}).get("tool_call_error")
    streamed_calls = [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())]
    check_contract(finish, streamed_calls, content or None, streamed_error)
    # Greedy: the same answer streamed or not.
    assert finish == choice.finish_reason and streamed_calls == calls and streamed_error == error
    assert all(c["id"].startswith("call_") for c in streamed.values())


def test_a_follow_up_with_the_result_is_answered(client):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculate", "arguments": json.dumps({"operation": "add", "a": 2, "b": 3})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    reply = client.chat.completions.create(
        model="smollm2", messages=history, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.content is not None and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 40
    auto = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, max_tokens=24, temperature=0)
    answer = auto.choices[0]
    if answer.message.tool_calls:  # a call comes back only whole and fitting its schema
        assert answer.finish_reason == "tool_calls"
        for call in answer.message.tool_calls:
            validate(json.loads(call.function.arguments), PARAMETERS)
    else:
        assert answer.message.content and answer.finish_reason in ("stop", "length")


def test_bad_tools_are_a_400_naming_the_place(client, server):
    from openai import BadRequestError

    bad = [{"type": "function", "function": {"name": "calculate", "parameters": {
        "type": "object", "properties": {"a": {"type": "numbr"}}}}}]  # fmt: skip
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=ASK, tools=bad, max_tokens=8)
    assert "tools.0.function.parameters.properties.a.type: 'numbr' is not valid" in err.value.message
    with pytest.raises(BadRequestError, match="tool_choice: names function 'search', which tools does not declare"):
        client.chat.completions.create(
            model="smollm2",
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "search"}},
            max_tokens=8,
        )
    r = requests.post(
        server.url + "/v1/completions",
        json={"prompt": "2 + 3 =", "tools": TOOLS},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert r.status_code == 400 and "tools: are taken by /v1/chat/completions only" in r.json()["error"]["message"]
