"""The generation service without HTTP: the server's answers, streams and refusals, called directly
over the tiny random Llama on the CPU."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import torch

from qlora_platform.infer.engine import Engine
from qlora_platform.infer.protocol import CompletionRequest
from qlora_platform.infer.sampling import SamplingParams
from qlora_platform.infer.service import ApiError, GenerationService, ServerSettings

HI = [{"role": "user", "content": "What is Python?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return Engine(model, tokenizer, static_cache=False)


def make_service(engine, **settings) -> GenerationService:
    options = {"model": "tiny", "served_name": "tiny", "max_model_len": 128, **settings}
    service = GenerationService(
        ServerSettings(**options), loader=lambda **kw: SimpleNamespace(engine=engine, device="cpu")
    )
    service.load()
    return service


@pytest.fixture(scope="module")
def service(engine):
    return make_service(engine)


@pytest.fixture(scope="module")
def run():
    """One event loop for the module: a worker thread's last event (its end marker) may come after
    the call that started it has returned, and must find the loop still open."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.run_until_complete(asyncio.sleep(0.2))
    loop.close()


def greedy_text(engine, prompt_ids, n):
    return engine.run(prompt_ids, SamplingParams(max_new_tokens=n, temperature=0)).text


async def streamed(service, kind, body) -> list[str]:
    chunks = await service.stream(kind, body)
    assert chunks is not None
    return [c async for c in chunks if c]


def events_of(chunks: list[str]) -> list[dict]:
    assert chunks[-1] == "data: [DONE]\n\n"
    return [json.loads(part[6:]) for c in chunks[:-1] for part in c.split("\n\n") if part]


def test_a_chat_completion_is_the_openai_body(run, service, engine):
    body = run(service.complete("chat", {"messages": HI, "max_tokens": 8, "temperature": 0}))
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == greedy_text(engine, engine.encode_chat(HI), 8)
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8 and usage["prompt_tokens"] == len(engine.encode_chat(HI))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    text = service.metrics.render().decode()
    assert 'qlora_tokens_total{kind="completion"}' in text and 'route="/v1/chat/completions"' in text


def test_a_completion_takes_the_request_model_or_a_dict(run, service, engine):
    req = CompletionRequest(prompt="The list", max_tokens=6, temperature=0)
    body = run(service.complete("completion", req))
    assert body["object"] == "text_completion" and body["choices"][0]["logprobs"] is None
    assert body["choices"][0]["text"] == greedy_text(engine, engine.encode_text("The list"), 6)
    again = run(service.complete("completion", req.model_dump()))
    assert again["choices"][0]["text"] == body["choices"][0]["text"]
    generated = run(service.complete("generate", {"prompt": "The list", "chat": False, "max_tokens": 6}))
    assert set(generated) == {"id", "text", "finish_reason", "usage", "timings"}


def test_a_stream_is_sse_chunks_ending_in_done(run, service, engine):
    body = {
        "messages": HI,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = events_of(run(streamed(service, "chat", body)))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == greedy_text(engine, engine.encode_chat(HI), 8)
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 8
    completion = events_of(run(streamed(service, "completion", {"prompt": "The list", "max_tokens": 4})))
    assert all(e["object"] == "text_completion" for e in completion)


@pytest.mark.parametrize(
    "kind, body, status, fragment",
    [
        ("chat", {"messages": HI, "temperature": 5}, 400, "temperature: Input should be less than or equal to 2"),
        ("chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ("completion", {"prompt": "hi", "max_tokens": 200}, 400, "max_tokens: the prompt has"),
        ("completion", {"prompt": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' is not served"),
        ("generate", {"prompt": "  "}, 400, "prompt: is empty"),
    ],
)
def test_a_bad_request_is_an_api_error_naming_the_field(run, service, kind, body, status, fragment):
    for stream in (False, True):
        with pytest.raises(ApiError) as err:
            call = service.stream if stream else service.complete
            run(call(kind, {**body, "stream": stream}))
        assert err.value.status == status and fragment in err.value.message, err.value.message
    assert service.state.scheduler.idle.wait(5)  # the refused job gave its queue place back


def test_a_cancelled_request_has_no_answer_and_frees_its_slot(run, service):
    async def cancelled():
        gone = asyncio.Event()
        gone.set()
        return await service.complete("completion", {"prompt": "The list", "max_tokens": 100}, cancel=gone)

    assert run(cancelled()) is None
    assert service.state.scheduler.idle.wait(5)


class Slow:
    """The engine with a pause per text piece (a generation that takes seconds), noting how runs end."""

    def __init__(self, engine):
        self.engine, self.finished = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, prompt, params, on_text=None, cancelled=None):
        def slow(piece):
            time.sleep(0.02)
            on_text(piece)

        result = self.engine.run(prompt, params, slow, cancelled)
        self.finished.append((result.finish_reason, result.completion_tokens))
        return result


def test_setting_cancel_stops_a_running_generation(run, engine):
    slow = Slow(engine)
    service = make_service(slow)
    body = {"prompt": "The list", "max_tokens": 100, "temperature": 0.8}

    async def cancelled_midway():
        gone = asyncio.Event()
        answer = asyncio.create_task(service.complete("completion", body, cancel=gone))
        while service.state.scheduler.active == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        gone.set()
        return await answer

    assert run(cancelled_midway()) is None
    assert service.state.scheduler.idle.wait(5)
    [(reason, tokens)] = slow.finished
    assert reason == "cancelled" and tokens < 100


def test_no_model_and_a_full_queue_are_refusals(run, engine):
    loading = GenerationService(ServerSettings(model="m"), loader=None)
    with pytest.raises(ApiError) as err:
        run(loading.complete("generate", {"prompt": "hi"}))
    assert err.value.status == 503 and err.value.code == "model_loading" and err.value.headers == {"Retry-After": "5"}
    assert loading.status()["status"] == "loading"

    full = make_service(engine, max_active=1, max_queue=0)

    async def two_at_once():
        first = await full.stream("completion", {"prompt": "The list", "max_tokens": 8})
        try:
            with pytest.raises(ApiError) as err:
                await full.complete("completion", {"prompt": "The list", "max_tokens": 8})
            return err.value
        finally:
            await first.__anext__()  # started, so that closing it runs its cleanup: the job is cancelled
            await first.aclose()

    refused = run(two_at_once())
    assert refused.status == 429 and refused.code == "queue_full" and int(refused.headers["Retry-After"]) >= 1
