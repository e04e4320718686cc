"""OpenAI `tools` in the chat API without a model: request validation, the prompt a request with
tools gets, and answers (whole and streamed) shaped from a scripted engine's text."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from qlora_platform.data.tools import CALL_CLOSE, CALL_OPEN, normalise_tools
from qlora_platform.data.tools_sample import TOOLS as SAMPLE_TOOLS
from qlora_platform.errors import UserError
from qlora_platform.infer.chat import chat_repl, load_tools
from qlora_platform.infer.engine import Engine
from qlora_platform.infer.generation import Generation
from qlora_platform.infer.protocol import ChatRequest
from qlora_platform.infer.sampling import SamplingParams
from qlora_platform.infer.service import ApiError, GenerationService, HeldText, ServerSettings, ToolPlan

HI = [{"role": "user", "content": "What is 2 + 3?"}]
CALC = next(t for t in SAMPLE_TOOLS if t["function"]["name"] == "calculate")
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [CALC, WEATHER]
GOOD_CALL = f'{CALL_OPEN}\n{{"name": "calculate", "arguments": {{"operation": "add", "a": 2, "b": 3}}}}\n{CALL_CLOSE}'


class Scripted:
    """An engine over the bundled tokenizer that answers with set texts (one per generation, the last
    repeated), in small pieces, honouring stop strings; it keeps what it was asked to render and run."""

    encode_chat_with = Engine.encode_chat
    encode_text = Engine.encode_text
    batcher = None
    max_context = 2048

    def __init__(self, tokenizer, *answers: str, finish: str = "stop"):
        self.tokenizer, self.answers, self.finish = tokenizer, list(answers), finish
        self.rendered: list[tuple[list[dict], list[dict] | None]] = []
        self.runs: list[tuple[list[int], object]] = []
        self.last: Generation | None = None

    def encode_chat(self, messages, tools=None, answer_prefix=""):
        self.rendered.append(([dict(m) for m in messages], tools))
        return self.encode_chat_with(messages, tools, answer_prefix)

    def run(self, prompt, params, on_text=None, cancelled=None):
        for piece in self.stream(prompt, params):
            if on_text:
                on_text(piece)
        return self.last

    def stream(self, prompt, params):
        self.runs.append((prompt, params))
        text, finish = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0), self.finish
        cuts = [text.index(s) for s in params.stop if s in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        for i in range(0, len(text), 5):
            yield text[i : i + 5]
        self.last = Generation(text, [0] * max(1, len(text) // 4), len(prompt), finish, 0.01, 0.01)


def make_service(engine) -> GenerationService:
    service = GenerationService(
        ServerSettings(model="tiny", served_name="tiny"),
        loader=lambda **kw: SimpleNamespace(engine=engine, device="cpu"),
    )
    service.load()
    return service


@pytest.fixture(scope="module")
def run():
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.run_until_complete(asyncio.sleep(0.2))
    loop.close()


def complete(run, engine, **body):
    return run(make_service(engine).complete("chat", {"messages": HI, "max_tokens": 32, **body}))


def stream_events(run, engine, **body) -> list[dict]:
    async def collect():
        chunks = await make_service(engine).stream("chat", {"messages": HI, "max_tokens": 32, "stream": True, **body})
        assert chunks is not None
        return [c async for c in chunks if c]

    chunks = run(collect())
    assert chunks[-1] == "data: [DONE]\n\n"
    return [json.loads(part[6:]) for c in chunks[:-1] for part in c.split("\n\n") if part]


def refusal(body: dict) -> str:
    service = GenerationService(ServerSettings(model="m"), loader=None)
    with pytest.raises(ApiError) as err:
        service.request("chat" if "messages" in body else "completion", body)
    assert err.value.status == 400
    return err.value.message


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {
                "tools": [
                    CALC,
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "numbr"}}},
                        },
                    },
                ]
            },
            "tools.1.function.parameters.properties.a.type: 'numbr' is not valid under any of the given schemas",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name must be"),
        ({"tools": [CALC, CALC]}, "tools.1.function.name 'calculate' is declared twice"),
        ({"tools": [{"name": "f", "description": "x\ud800"}]}, "tools.0.description: is not valid Unicode"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}},
            "tool_choice: names function 'search', which tools does not declare (declared: calculate, weather)",
        ),
        ({"tool_choice": "required"}, "tool_choice: there are no tools to choose from"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice: must be 'auto', 'none', 'required' or"),
        ({"functions": [CALC["function"]]}, "functions: is OpenAI's retired function-calling API; send tools"),
        ({"function_call": "auto"}, "function_call: is OpenAI's retired function-calling API"),
    ],
)
def test_a_bad_tools_request_is_refused_naming_the_place(body, message):
    assert message in refusal({"messages": HI, **body})


def test_tools_are_refused_outside_chat():
    assert "tools: are taken by /v1/chat/completions only" in refusal({"prompt": "hi", "tools": TOOLS})
    service = GenerationService(ServerSettings(model="m"), loader=None)
    with pytest.raises(ApiError, match="tools: are taken by /v1/chat/completions only"):
        service.request("generate", {"prompt": "hi", "tools": TOOLS})
    with pytest.raises(ApiError, match="functions: is OpenAI's retired"):
        service.request("generate", {"prompt": "hi", "functions": [CALC["function"]]})


def assistant_call(arguments='{"operation": "add", "a": 2, "b": 3}', call_id="call_1") -> dict:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "calculate", "arguments": arguments}}],
    }


def test_tool_turns_are_accepted_and_linked_by_id():
    req = ChatRequest.model_validate(
        {
            "messages": [*HI, assistant_call(), {"role": "tool", "tool_call_id": "call_1", "content": "5"}],
            "tools": TOOLS,
        }
    )
    assistant, tool = req.template_messages()[1:]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "calculate",
        "arguments": {"operation": "add", "a": 2, "b": 3},
    }
    assert assistant["content"] == "" and tool == {
        "role": "tool",
        "tool_call_id": "call_1",
        "name": "calculate",
        "content": "5",
    }
    assert req.tool_mode == "auto" and req.tools[0]["function"]["name"] == "calculate"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([*HI, assistant_call("{'a': 2}")], "messages.1.tool_calls.0.function.arguments: is not JSON"),
        ([*HI, assistant_call("[2, 3]")], "messages.1.tool_calls.0.function.arguments: must be a JSON object"),
        ([*HI, assistant_call(), {"role": "tool", "content": "5"}], "messages.2: a tool message needs tool_call_id"),
        (
            [*HI, assistant_call(), {"role": "tool", "tool_call_id": "call_9", "content": "5"}],
            "messages.2: tool_call_id 'call_9' answers no call",
        ),
        ([*HI, assistant_call(), *HI], "messages.2: call(s) call_1 have no tool message"),
        (
            [*HI, {**assistant_call(), "tool_calls": assistant_call()["tool_calls"] * 2}],
            "messages.1: two tool_calls share an id",
        ),
        ([*HI, {"role": "user", "content": None}], "messages.1: a user message needs content"),
    ],
)
def test_bad_tool_turns_are_refused_naming_the_message(messages, message):
    assert message in refusal({"messages": messages, "tools": TOOLS})


# -- prompts -------------------------------------------------------------------------------------


def test_the_prompt_has_the_tools_unless_tool_choice_is_none(run, tokenizer):
    engine = Scripted(tokenizer, "Five.")
    complete(run, engine, tools=TOOLS)
    messages, tools = engine.rendered[-1]
    assert [t["function"]["name"] for t in tools] == ["calculate", "weather"]
    assert "<tools>" in tokenizer.decode(engine.runs[-1][0])
    history = [*HI, assistant_call(), {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    complete(run, engine, tools=TOOLS, tool_choice="none", messages=history)
    messages, tools = engine.rendered[-1]
    prompt = tokenizer.decode(engine.runs[-1][0])
    assert tools is None and "<tools>" not in prompt  # no schemas, but the tool turns are there
    assert '"arguments": {"operation": "add", "a": 2, "b": 3}' in prompt and "<tool_response>\n5\n" in prompt


@pytest.mark.parametrize(
    "choice, prefix",
    [
        ("required", f'{CALL_OPEN}\n{{"name": "'),
        ({"type": "function", "function": {"name": "calculate"}}, f'{CALL_OPEN}\n{{"name": "calculate", "arguments":'),
    ],
)
def test_a_required_call_is_forced_by_the_prompt_and_read_with_its_prefix(run, tokenizer, choice, prefix):
    rest = GOOD_CALL[len(prefix) :]
    engine = Scripted(tokenizer, rest + "\nAnd more text after the call.")
    body = complete(run, engine, tools=TOOLS, tool_choice=choice)
    prompt, params = engine.runs[-1]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n" + prefix)
    # The prompt's ids are those that the same text in training starts with: the prefix is tokenized with
    # the prompt, and it ends where a token ends in the trained call.
    trained = tokenizer(tokenizer.decode(prompt) + rest, add_special_tokens=False)["input_ids"]
    assert trained[: len(prompt)] == list(prompt)
    assert (CALL_CLOSE in params.stop) == isinstance(choice, dict)  # a named call ends where it closes
    choice_ = body["choices"][0]
    assert choice_["finish_reason"] == "tool_calls" and "tool_call_error" not in choice_
    [call] = choice_["message"]["tool_calls"]
    assert call["function"]["name"] == "calculate" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"operation": "add", "a": 2, "b": 3}


# -- answers -------------------------------------------------------------------------------------


def test_a_call_is_returned_as_openai_tool_calls(run, tokenizer):
    engine = Scripted(tokenizer, "Let me work it out.\n" + GOOD_CALL)
    body = complete(run, engine, tools=TOOLS)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] == "Let me work it out."
    [call] = message["tool_calls"]
    assert set(call) == {"id", "type", "function"} and call["type"] == "function"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"operation": "add", "a": 2, "b": 3}
    only_call = complete(run, Scripted(tokenizer, GOOD_CALL), tools=TOOLS)["choices"][0]["message"]
    assert only_call["content"] is None


def test_plain_answers_stay_plain(run, tokenizer):
    body = complete(run, Scripted(tokenizer, "It is five.", finish="length"), tools=TOOLS)
    choice = body["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "It is five."},
        "finish_reason": "length",
    }
    no_tools = complete(run, Scripted(tokenizer, GOOD_CALL))["choices"][0]
    assert no_tools["message"]["content"] == GOOD_CALL and no_tools["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "answer, body, error",
    [
        (f'{CALL_OPEN}\n{{"name": "calculate", "arguments": {{"a": 2,', {}, "is not a JSON call object"),
        (
            f'{CALL_OPEN}{{"name": "calculate", "arguments": {{"operation": "add", "a": "two", "b": 3}}}}{CALL_CLOSE}',
            {},
            "call 0 the arguments of 'calculate' do not fit its schema: arguments.a: 'two' is not of type 'number'",
        ),
        (
            f'{CALL_OPEN}{{"name": "search", "arguments": {{}}}}{CALL_CLOSE}',
            {},
            "call 0 calls 'search', which is not a declared tool (declared: calculate, weather)",
        ),
        ("No call here.", {"tool_choice": "required"}, "a <tool_call> block is not a JSON call object"),
        (
            GOOD_CALL + f'{CALL_OPEN}{{"name": "weather", "arguments": {{}}}}{CALL_CLOSE}',
            {"parallel_tool_calls": False},
            "the answer holds 2 calls and parallel_tool_calls is false",
        ),
    ],
)
def test_a_call_that_does_not_parse_or_fit_comes_back_as_text(run, tokenizer, caplog, answer, body, error):
    engine = Scripted(tokenizer, answer)
    with caplog.at_level("WARNING", logger="qlora.serve"):
        choice = complete(run, engine, tools=TOOLS, **body)["choices"][0]
    prefix = f'{CALL_OPEN}\n{{"name": "' if body.get("tool_choice") == "required" else ""
    assert choice["message"] == {"role": "assistant", "content": prefix + answer}
    assert choice["finish_reason"] == "stop" and error in choice["tool_call_error"]
    assert error in caplog.text
    events = stream_events(run, engine, tools=TOOLS, **body)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert streamed == prefix + answer
    assert error in events[-1]["choices"][0]["tool_call_error"]
    assert not any("tool_calls" in e["choices"][0]["delta"] for e in events)


def test_a_template_that_renders_tools_gets_no_prefix_and_a_required_call_is_checked_after():
    native = SimpleNamespace(tokenizer=SimpleNamespace(chat_template="{{ tools }} {{ message.tool_calls }}"))
    req = ChatRequest.model_validate(
        {"messages": HI, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculate"}}}
    )
    plan = ToolPlan.of(req, native)
    assert plan is not None and plan.prefix == "" and not plan.one_call
    assert plan.read("No call here.").error == "tool_choice needs a call of 'calculate'; the answer holds none"
    weather = plan.read('[TOOL_CALLS][{"name": "weather", "arguments": {}}]')
    assert weather.error == "call 0 calls 'weather', but tool_choice names 'calculate'" and not weather.calls
    bare = plan.read('{"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}')
    assert bare.error is None and bare.content is None and len(bare.calls) == 1
    none = ChatRequest.model_validate({"messages": HI, "tools": TOOLS, "tool_choice": "none"})
    assert ToolPlan.of(none, native) is None


# -- streaming -----------------------------------------------------------------------------------


def test_a_streamed_call_is_one_tool_calls_delta_then_the_finish(run, tokenizer):
    engine = Scripted(tokenizer, "Let me work it out.\n" + GOOD_CALL + f'{CALL_OPEN}{{"name": "weather"}}{CALL_CLOSE}')
    events = stream_events(run, engine, tools=TOOLS, stream_options={"include_usage": True})
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Let me work it out.\n"  # the text before the call, streamed; the calls held
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert [[c["index"] for c in cs] for cs in calls] == [[0], [1]]
    first, second = calls[0][0], calls[1][0]
    assert first["type"] == "function" and first["id"].startswith("call_") and first["id"] != second["id"]
    assert first["function"]["name"] == "calculate"
    assert json.loads(first["function"]["arguments"]) == {"operation": "add", "a": 2, "b": 3}
    assert second["function"] == {"name": "weather", "arguments": "{}"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and events[-2]["choices"][0]["delta"] == {}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0


def test_a_streamed_plain_answer_is_the_same_text(run, tokenizer):
    text = "Five. A <b>bold</b> answer, [a list], and {braces} later."
    events = stream_events(run, Scripted(tokenizer, text), tools=TOOLS)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "tool_call_error" not in events[-1]["choices"][0]


def test_held_text_releases_what_cannot_start_a_call():
    held = HeldText("")
    assert held.push("Sum: <to") == "Sum: "  # a marker may be starting
    assert held.push("p> done ") == "<top> done "  # it was not one
    assert held.push("<tool_") == "" and held.push('call>{"name"') == ""
    assert held.text[held.sent :] == '<tool_call>{"name"'
    forced = HeldText(f'{CALL_OPEN}\n{{"name": "')
    assert forced.push('calculate", ') == ""  # the forced opening holds everything


# -- qlora chat --tools --------------------------------------------------------------------------


def repl(engine, lines: list[str], tools=TOOLS):
    feed, out, err, asked = iter(lines), [], [], []

    def read(prompt):
        asked.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    tools = normalise_tools(tools, "test") if tools else None
    params = SamplingParams(max_new_tokens=32)
    code = chat_repl(engine, params, read=read, write=out.append, err=err.append, label="scripted", tools=tools)
    return code, "".join(out), err, asked


def test_the_repl_shows_calls_asks_for_results_and_answers_from_them(tokenizer):
    engine = Scripted(tokenizer, "Adding.\n" + GOOD_CALL, "The sum is 5.")
    code, out, err, asked = repl(engine, ["What is 2 + 3?", " 5 ", "/tools", "/exit"])
    assert code == 0 and "and 2 tool(s)" in err[0]
    assert 'Adding.\n[call] calculate({"operation": "add", "a": 2, "b": 3})\n' in out
    assert CALL_OPEN not in out and out.endswith("The sum is 5.\n")
    assert asked[:3] == ["\n> ", "tool result for calculate> ", "\n> "]
    (first, first_tools), (second, second_tools) = engine.rendered
    assert [t["function"]["name"] for t in first_tools] == ["calculate", "weather"] and second_tools == first_tools
    assert [m["role"] for m in second] == ["user", "assistant", "tool"]
    call = second[1]["tool_calls"][0]
    assert second[1]["content"] == "Adding." and call["function"]["arguments"] == {"operation": "add", "a": 2, "b": 3}
    assert second[2] == {"role": "tool", "tool_call_id": call["id"], "name": "calculate", "content": "5"}
    assert "<tool_response>\n5\n</tool_response>" in tokenizer.decode(engine.runs[1][0])
    assert any("calculate(operation, a, b): a <operation> b" in e for e in err)  # /tools


def test_the_repl_keeps_a_bad_call_as_text_and_lists_no_tools_without_them(tokenizer):
    bad = f'{CALL_OPEN}{{"name": "calculate", "arguments": {{"a": 2}}}}{CALL_CLOSE}'
    engine = Scripted(tokenizer, bad)
    _, out, err, asked = repl(engine, ["What is 2 + 3?", "again?"])
    assert out.startswith(bad + "\n") and "tool result" not in "".join(asked)
    assert any("not a valid tool call, kept as text: call 0 the arguments of 'calculate'" in e for e in err)
    assert [m["role"] for m in engine.rendered[-1][0]] == ["user", "assistant", "user"]
    _, _, err, _ = repl(Scripted(tokenizer, "hi"), ["/tools"], tools=None)
    assert "(no tools: start with --tools)" in err


def test_the_repl_drops_a_call_with_no_result(tokenizer):
    engine = Scripted(tokenizer, GOOD_CALL, "never")
    _, _, err, asked = repl(engine, ["What is 2 + 3?"])  # the feed ends at the result prompt
    assert asked[-2:] == ["tool result for calculate> ", "\n> "] and any("no result given" in e for e in err)
    assert len(engine.runs) == 1


def test_tools_files_are_checked_with_one_line_each(tmp_path):
    good = tmp_path / "tools.json"
    good.write_text(json.dumps(TOOLS))
    assert [t["function"]["name"] for t in load_tools(str(good))] == ["calculate", "weather"]
    with pytest.raises(UserError, match="'.*nope.json' does not exist"):
        load_tools(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"name": "f",\n')
    with pytest.raises(UserError, match=r"is not JSON \(.* at line 2\); give a list of tool schemas"):
        load_tools(str(broken))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 3}}}}]))
    with pytest.raises(UserError, match=r"bad.json: tools.0.parameters.properties.x.type: 3 is not valid"):
        load_tools(str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(UserError, match="declares no tools"):
        load_tools(str(empty))
