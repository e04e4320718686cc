"""The real server on loopback with the bundled model: SDKs, keys, bad requests, load, disconnects, SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.infer.conftest import KEY, ServerProcess

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "What is Python?"}]


def post(server, path, body, headers=AUTH, **kw):
    return requests.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


def gauge(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_health_is_public_and_keyed_routes_need_a_key(server):
    assert server.ready["status"] == "ok"
    health = requests.get(server.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # nothing more in public
    status = requests.get(server.url + "/status", headers=AUTH, timeout=5).json()
    assert status["model"] == "smollm2" and status["load_error"] is None
    for method, path in [
        ("get", "/v1/models"),
        ("get", "/metrics"),
        ("get", "/status"),
        ("post", "/v1/chat/completions"),
        ("post", "/v1/completions"),
        ("post", "/generate"),
    ]:
        r = getattr(requests, method)(server.url + path, timeout=5)
        assert r.status_code == 401, path
        assert set(r.json()["error"]) == {"message", "type", "code"} and "API key" in r.json()["error"]["message"]
    wrong = requests.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope-nope-nope"}, timeout=5)
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    ok = requests.get(server.url + "/v1/models", headers={"X-Api-Key": KEY}, timeout=5)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "smollm2"


def test_openai_sdk_plain_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    reply = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    stream = client.chat.completions.create(
        model="smollm2", messages=HI, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: same text streamed or not
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    done = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 6
    seeded = [
        client.chat.completions.create(model="smollm2", messages=HI, max_tokens=10, temperature=0.9, seed=3)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_requests_generate_plain_and_sse(server):
    r = post(server, "/generate", {"prompt": "Name a Python web framework.", "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200 and r.json()["text"] and r.json()["timings"]["decode_tokens_per_s"] >= 0
    with post(
        server,
        "/generate",
        {"prompt": "Name a Python web framework.", "max_tokens": 10, "temperature": 0, "stream": True},
        stream=True,
    ) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(e.get("text", "") for e in events) == r.json()["text"] and events[-1]["done"]


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/chat/completions", {"messages": []}, 400, "messages: List should have at least 1 item"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400, "at least one user message"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"messages": HI, "temperature": 5}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": HI, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": HI, "n": 2}, 400, "n:"),
        (
            "/v1/chat/completions",
            {"messages": HI, "max_tokens": 9000},
            400,
            r"prompt has \d+ tokens and max_tokens is 9000",
        ),
        ("/v1/chat/completions", {"messages": HI, "model": "gpt-4"}, 404, "model 'gpt-4' is not served"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt: Value error, is empty|prompt: is empty"),
        ("/generate", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop takes up to 4"),
        ("/nope", {}, 404, "no route POST /nope"),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, path, body, status, fragment):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and re.search(fragment, err["message"]), err


def test_malformed_json_and_oversized_bodies(server):
    r = requests.post(
        server.url + "/v1/chat/completions",
        data=b'{"messages": [',
        timeout=10,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    r = post(server, "/v1/chat/completions", big)
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]
    # Chunked upload without Content-Length is counted too.
    r = requests.post(
        server.url + "/generate",
        data=iter([b'{"prompt": "', b"y" * 70_000, b'"}']),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413


def test_burst_gets_only_200_429_503_and_the_server_stays_healthy(server):
    def one(i):
        t = time.time()
        r = post(
            server,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8, "temperature": 0},
        )
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
        return r.status_code, tokens, time.time() - t

    start = time.time()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(48)))
    wall = time.time() - start
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429, 503} and codes.count(200) >= 6 and 429 in codes
    assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"
    assert gauge(server, "qlora_active_generations") == 0 and gauge(server, "qlora_queue_depth") == 0
    tokens = sum(t for _, t, _ in results)
    print(
        f"\nburst: 48 requests from 16 threads in {wall:.1f} s: {codes.count(200)} x 200, "
        f"{codes.count(429)} x 429, {codes.count(503)} x 503; {tokens} tokens, {tokens / wall:.1f} tokens/s"
    )


def test_a_disconnecting_client_frees_its_slot(server):
    s = requests.Session()
    r = s.post(
        server.url + "/v1/chat/completions",
        json={"messages": HI, "max_tokens": 4000, "stream": True, "temperature": 0.8, "repetition_penalty": 1.0},
        headers=AUTH,
        stream=True,
        timeout=60,
    )
    lines = r.iter_lines()
    next(lines)
    next(lines)
    assert gauge(server, "qlora_active_generations") == 1
    r.close()
    s.close()
    deadline = time.time() + 15
    while gauge(server, "qlora_active_generations") != 0:
        assert time.time() < deadline, "the generation kept its slot after the client left"
        time.sleep(0.2)


def test_a_disconnecting_non_streaming_client_frees_its_slot(server):
    body = json.dumps({"messages": HI, "max_tokens": 4000, "temperature": 0.8}).encode()
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    conn.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.time() + 30
    while gauge(server, "qlora_active_generations") != 1:
        assert time.time() < deadline, "the generation never started"
        time.sleep(0.1)
    conn.close()
    deadline = time.time() + 15
    while gauge(server, "qlora_active_generations") != 0:
        assert time.time() < deadline, "the generation kept its slot after the client left"
        time.sleep(0.2)


def test_sigterm_lets_in_flight_requests_finish():
    srv = ServerProcess("--drain-timeout", "60")
    try:
        assert srv.wait_ready()["status"] == "ok"
        answer = {}

        def call():
            answer["r"] = requests.post(
                srv.url + "/v1/completions",
                timeout=120,
                json={"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stop": ["@@@@"]},
            )

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.time() + 30
        while requests.get(srv.url + "/status", timeout=5).json()["active"] == 0:
            assert time.time() < deadline
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        assert answer["r"].status_code == 200, answer["r"].text
        assert answer["r"].json()["choices"][0]["finish_reason"] in ("stop", "length")
        # uvicorn re-raises the captured SIGTERM once drained: exit status 0 or -SIGTERM, both clean.
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(requests.ConnectionError):
            requests.get(srv.url + "/health", timeout=2)
    finally:
        srv.stop()
