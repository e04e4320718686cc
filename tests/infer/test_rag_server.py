"""`qlora serve --rag INDEX` with the bundled model: OpenAI answers carry their sources in a field the
SDK keeps aside (whole and streamed), /generate too, `"rag": false` skips retrieval, /status names the index."""

from __future__ import annotations

import pytest
import requests

from tests.infer.conftest import ServerProcess

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "How do I use shlex.split?"}]


@pytest.fixture(scope="module")
def rag_server(sample_index):
    srv = ServerProcess("--rag", str(sample_index), "--rag-k", "3")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(rag_server):
    from openai import OpenAI

    return OpenAI(base_url=rag_server.url + "/v1", api_key="unused")


def test_chat_answers_carry_their_sources(client, rag_server):
    reply = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=12, temperature=0)
    sources = reply.model_extra["sources"]
    assert [s["n"] for s in sources] == [1, 2, 3] and sources[0]["heading"] == "shlex.split"
    assert sources[0]["source"].endswith("shlex.html") and sources[0]["text"] and sources[0]["score"] > 0
    # The passages went into the prompt: it is longer than the question alone.
    plain = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=12, temperature=0, extra_body={"rag": False}
    )
    assert "sources" not in (plain.model_extra or {})
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 100

    stream = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].model_extra["sources"] == sources
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content

    status = requests.get(rag_server.url + "/status", timeout=10).json()
    assert status["retrieval"].startswith(str(rag_server.proc.args[rag_server.proc.args.index("--rag") + 1]))


def test_generate_carries_its_sources(rag_server):
    body = requests.post(
        rag_server.url + "/generate", json={"prompt": "What does fnmatch.fnmatch do?", "max_tokens": 8}, timeout=120
    ).json()
    assert body["sources"][0]["heading"].startswith("fnmatch") and len(body["sources"]) == 3
    streamed = requests.post(
        rag_server.url + "/generate",
        json={"prompt": "What does fnmatch.fnmatch do?", "max_tokens": 8, "stream": True},
        timeout=120,
    ).text
    assert '"done": true' in streamed and '"sources": [{"n": 1' in streamed
    raw = requests.post(
        rag_server.url + "/generate", json={"prompt": "Once upon", "chat": False, "max_tokens": 4}, timeout=120
    ).json()
    assert "sources" not in raw  # a plain continuation is not a question
