"""The server under hostile or careless clients, on the CPU: values that once broke the sampler or
the batcher, keys that were silently off, clients that leave, slow bodies, oversized requests,
and a mixed burst of all of them after which every slot is free again. The server runs in
this process (uvicorn on loopback) over the tiny random Llama, so each test takes seconds."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
import torch

from qlora_platform.errors import UserError
from qlora_platform.infer.auth import ApiKeys
from qlora_platform.infer.engine import Engine
from qlora_platform.infer.generation import TextRow
from qlora_platform.infer.sampling import SamplingParams, choose_next
from tests.infer.conftest import KEY, free_port

AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "What is Python?"}]


@pytest.fixture(scope="module", autouse=True)
def plain_cpu_decoding():
    """The batcher's decoder on PyTorch's CPU kernels, not the Triton interpreter (which tests of
    the kernels turn on), and one intra-op thread: the model's thread and the clients' threads
    share a few cores, and OpenMP pools of different threads would spin against each other."""
    from qlora_platform.kernels import _triton

    before = torch.get_num_threads(), _triton.INTERPRET
    torch.set_num_threads(1)
    _triton.INTERPRET = False
    yield
    torch.set_num_threads(before[0])
    _triton.INTERPRET = before[1]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


# -- sampling and the batcher ------------------------------------------------------------------


def test_tiny_temperatures_and_broken_logits_take_the_argmax():
    logits = torch.tensor([[0.5, 3.0, -1.0, 0.0]])
    for temperature in (1e-38, 1e-6):
        assert choose_next(logits, SamplingParams(temperature=temperature), None, None).tolist() == [1]
    overflowing = torch.tensor([[1.0, float("inf"), 2.0, float("nan")]])
    generator = torch.Generator().manual_seed(0)
    assert choose_next(overflowing, SamplingParams(temperature=0.7, top_p=0.9), None, generator).tolist() == [1]
    assert choose_next(torch.full((1, 4), float("-inf")), SamplingParams(temperature=1.0), None, None).shape == (1,)


def test_a_request_failing_at_admission_fails_alone_and_frees_its_row(model, tokenizer, monkeypatch):
    from qlora_platform.infer import batcher as batcher_module

    real = batcher_module.choose_next

    def choose(logits, params, history, generator):
        if params.seed == 13:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, history, generator)

    monkeypatch.setattr(batcher_module, "choose_next", choose)
    engine = Engine(model, tokenizer)
    engine.enable_batching(slots=3, max_len=256)
    prompt = engine.encode_text("The list")
    params = SamplingParams(max_new_tokens=120, ignore_eos=True)
    want = Engine(model, tokenizer, static_cache=False).run(prompt, params).token_ids
    started = [threading.Event(), threading.Event()]
    got, errors = {}, {}

    def run(name, p, on_text=None):
        try:
            got[name] = engine.run(prompt, p, on_text=on_text)
        except Exception as err:  # noqa: BLE001 - recorded for the asserts
            errors[name] = err

    runners = [threading.Thread(target=run, args=(i, params, lambda _, i=i: started[i].set())) for i in range(2)]
    for t in runners:
        t.start()
    for e in started:
        assert e.wait(30)
    bad = threading.Thread(target=run, args=("bad", SamplingParams(max_new_tokens=20, temperature=0.8, seed=13)))
    bad.start()
    bad.join(20)
    assert not bad.is_alive(), "the request whose sampling failed never got an answer"
    assert "inf, nan" in str(errors["bad"])
    for t in runners:
        t.join(60)
    assert not errors.get(0) and not errors.get(1), errors
    assert got[0].token_ids == want and got[1].token_ids == want  # the running rows went on unharmed
    assert engine.batcher.active == {}
    assert engine.run(prompt, params).token_ids == want  # and the batcher still serves


def test_detokenisation_cost_is_linear_and_exact(tokenizer):
    class Counting:
        def __init__(self, tok):
            self.tok, self.decoded = tok, 0

        def decode(self, ids, **kw):
            self.decoded += len(ids)
            return self.tok.decode(ids, **kw)

    ids = tokenizer("Streaming text, token by token: naïve café 🙂 " * 60, add_special_tokens=False)["input_ids"]
    counting = Counting(tokenizer)
    row = TextRow(counting, ["@@@"])
    pieces = []
    for token in ids:
        row.push(token, set(), True)
        pieces.append(row.new_text())
    row.finish = "length"
    pieces.append(row.new_text())
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert row.text == full and "".join(pieces) == full
    assert counting.decoded < 12 * len(ids), f"{counting.decoded} tokens decoded for {len(ids)}"


# -- keys --------------------------------------------------------------------------------------


def test_a_key_source_without_a_key_is_a_startup_error(tmp_path):
    with pytest.raises(UserError, match=r"--api-key gives no API key: the value is empty"):
        ApiKeys.gather([""], environ={})
    with pytest.raises(UserError, match=r"\$QLORA_API_KEYS gives no API key"):
        ApiKeys.gather(None, environ={"QLORA_API_KEYS": " , "})
    with pytest.raises(UserError, match=r"\$QLORA_API_KEY gives no API key"):
        ApiKeys.gather([KEY], environ={"QLORA_API_KEY": ""})
    comments = tmp_path / "keys.txt"
    comments.write_text("# put keys here\n\n   \n")
    with pytest.raises(UserError, match=r"API key file '.*keys.txt' gives no API key: .*one key per line"):
        ApiKeys.gather(None, str(comments), environ={})
    assert not ApiKeys.gather(None, None, environ={}).enabled  # no source at all: a choice
    comments.write_text(f"# the team's key\n{KEY}\n")
    assert len(ApiKeys.gather(None, str(comments), environ={"QLORA_API_KEYS": "another-key-123"})) == 2


def test_serve_refuses_an_empty_key_and_warns_about_keys_on_the_command_line(monkeypatch, capsys):
    from qlora_platform import cli
    from qlora_platform.infer import server

    calls = []
    monkeypatch.setattr(server, "serve", lambda settings, *a, **kw: calls.append((settings, a, kw)) or 0)
    monkeypatch.delenv("QLORA_API_KEYS", raising=False)
    monkeypatch.delenv("QLORA_API_KEY", raising=False)
    assert cli.main(["serve", "--model", "m", "--api-key", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --api-key gives no API key")
    assert not calls
    assert (
        cli.main(
            [
                "serve",
                "--model",
                "m",
                "--api-key",
                KEY,
                "--max-connections",
                "7",
                "--access-log",
                "--max-model-len",
                "300",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("visible") == 1 and "--api-key-file" in err
    settings, _, kw = calls[0]
    assert settings.keys.enabled and settings.max_model_len == 300
    assert kw == {"access_log": True, "max_connections": 7}
    config = server.uvicorn_config(None, "127.0.0.1", 1, max_connections=7)
    assert config.limit_concurrency == 7 and config.access_log is False


# -- the live server ---------------------------------------------------------------------------


class Wrapped:
    """An engine as the server sees it, with hooks: where prompts are tokenized, how runs end,
    and optionally a pause per text piece (a generation that takes seconds)."""

    def __init__(self, engine, pause: float = 0.0):
        self.engine, self.pause = engine, pause
        self.encoded, self.finished, self.lengths = [], [], []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _note(self):
        try:
            asyncio.get_running_loop()
            self.encoded.append("event loop")
        except RuntimeError:
            self.encoded.append(threading.current_thread().name)

    def encode_chat(self, messages):
        self._note()
        return self.engine.encode_chat(messages)

    def encode_text(self, prompt):
        self._note()
        return self.engine.encode_text(prompt)

    def run(self, prompt, params, on_text=None, cancelled=None):
        def slow(piece):
            time.sleep(self.pause)
            on_text(piece)

        result = self.engine.run(prompt, params, slow if self.pause and on_text else on_text, cancelled)
        self.finished.append(result.finish_reason)
        self.lengths.append(result.completion_tokens)
        return result


class LiveServer:
    def __init__(self, engine, **settings):
        import uvicorn

        from qlora_platform.infer.server import ServerSettings, create_app, uvicorn_config

        self.engine = engine
        options = {"model": "tiny", "served_name": "tiny", "keys": ApiKeys([KEY]), **settings}
        connections = options.pop("max_connections", 64)
        loader = lambda **kw: SimpleNamespace(engine=engine, device="cpu")  # noqa: E731
        self.app = create_app(ServerSettings(**options), loader=loader)
        self.state = self.app.state.qlora
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn_config(self.app, "127.0.0.1", self.port, log_level="warning", max_connections=connections)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while True:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "the in-process server did not start"
            time.sleep(0.05)

    def post(self, path, body, headers=AUTH, **kw):
        return requests.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def raw(self, head: bytes, body: bytes = b"") -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        conn.sendall(head + body)
        return conn

    def idle(self, timeout: float = 10) -> bool:
        """Every generation slot, queue place and batcher row free again."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = requests.get(self.url + "/status", headers=AUTH, timeout=5).json()
            if s["active"] == 0 and s["waiting"] == 0 and s["batch_rows_active"] == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


def request_head(path: str, length: int, key: str | None = KEY, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{auth}{extra}\r\n"
    ).encode()


def status_of(conn: socket.socket) -> int:
    reply = conn.recv(65536)
    conn.close()
    return int(reply.split(b" ", 2)[1]) if reply else 0


@pytest.fixture(scope="module")
def live(model, tokenizer):
    engine = Wrapped(Engine(model, tokenizer, static_cache=False), pause=0.0)
    srv = LiveServer(
        engine,
        max_active=1,
        max_queue=0,
        max_body_bytes=4096,
        body_timeout=1.0,
        max_model_len=128,
        cors_origins=["http://ui.example"],
    )
    try:
        yield srv
    finally:
        srv.stop()


def test_health_is_minimal_and_details_need_the_key(live):
    assert requests.get(live.url + "/health", timeout=5).json() == {"status": "ok"}
    assert requests.get(live.url + "/status", timeout=5).status_code == 401
    status = requests.get(live.url + "/status", headers=AUTH, timeout=5).json()
    assert status["model"] == "tiny" and status["load_error"] is None and status["active"] == 0


def test_a_failed_load_shows_only_its_status_on_health():
    from fastapi.testclient import TestClient

    from qlora_platform.infer.server import ServerSettings, create_app

    def broken_loader(**kw):
        raise UserError("model '/secret/adapters/m' was not found")

    settings = ServerSettings(model="m", keys=ApiKeys([KEY]))
    with TestClient(create_app(settings, loader=broken_loader, load_in_background=False)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "error"}
        assert "/secret/adapters/m" in client.get("/status", headers=AUTH).json()["load_error"]


def test_the_key_is_checked_before_the_body_is_read(live):
    conn = live.raw(request_head("/v1/completions", 2000, key=None))  # headers only, no body
    assert status_of(conn) == 401


def test_a_slow_body_gets_408_at_the_deadline(live):
    start = time.time()
    conn = live.raw(request_head("/v1/completions", 200), b'{"prompt": "slo')
    assert status_of(conn) == 408 and time.time() - start < 5
    assert live.idle()


def test_cors_headers_come_with_401_and_413(live):
    origin = {"Origin": "http://ui.example"}
    r = requests.get(live.url + "/v1/models", headers=origin, timeout=5)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://ui.example"
    r = live.post("/v1/completions", {"prompt": "x" * 5000}, headers={**AUTH, **origin})
    assert r.status_code == 413 and r.headers["access-control-allow-origin"] == "http://ui.example"


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed: Input should be less than or equal to"),
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt: is not valid Unicode"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "\udfff"}]},
            "content: is not valid Unicode",
        ),
        (
            "/v1/chat/completions",
            {"messages": HI, "logit_bias": {"50": 100}},
            "logit_bias: logit_bias is not supported",
        ),
        ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_object"}}, "response_format: type"),
        (
            "/v1/chat/completions",
            {"messages": HI, "presence_penalty": 0.5},
            "presence_penalty: presence_penalty is not",
        ),
        ("/v1/chat/completions", {"messages": HI, "frequency_penalty": 3}, "frequency_penalty: Input should be less"),
        ("/v1/chat/completions", {"messages": HI, "repetition_penalty": 1e-30}, "repetition_penalty: Input should be"),
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": 200},
            r"max_tokens: the prompt has \d+ tokens and max_tokens "
            r"is 200: \d+ is over this server's limit of 128 tokens "
            r"\(--max-model-len\)",
        ),
    ],
)
def test_bad_values_are_a_400_naming_the_field(live, path, body, fragment):
    import re

    r = live.post(path, body)
    assert r.status_code == 400, r.text
    assert re.search(fragment, r.json()["error"]["message"]), r.json()


def test_a_tiny_temperature_is_greedy(live):
    body = {"prompt": "The list", "max_tokens": 8}
    tiny = live.post("/v1/completions", {**body, "temperature": 1e-38})
    greedy = live.post("/v1/completions", {**body, "temperature": 0})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    ok = live.post(
        "/v1/completions",
        {
            **body,
            "temperature": 0.7,
            "response_format": {"type": "text"},
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "logit_bias": {},
        },
    )
    assert ok.status_code == 200


def test_prompts_are_tokenized_off_the_event_loop_and_only_once_admitted(live):
    live.engine.encoded.clear()
    live.engine.pause = 0.05
    try:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(live.post, "/v1/completions", {"prompt": "The list", "max_tokens": 40})
            deadline = time.time() + 10
            while requests.get(live.url + "/status", headers=AUTH, timeout=5).json()["active"] == 0:
                assert time.time() < deadline
                time.sleep(0.02)
            refused = live.post("/v1/chat/completions", {"messages": HI, "max_tokens": 4})  # max_queue 0
            assert refused.status_code == 429
            assert busy.result().status_code == 200
    finally:
        live.engine.pause = 0.0
    assert live.engine.encoded == ["qlora-generate"]  # once, in the worker; none for the 429


def test_a_non_streaming_client_that_leaves_frees_its_slot(live):
    live.engine.pause = 0.05  # 100 tokens: 5 s if it ran to the end
    live.engine.finished.clear()
    try:
        body = json.dumps({"prompt": "The list", "max_tokens": 100, "temperature": 0.8}).encode()
        conn = live.raw(request_head("/v1/completions", len(body)), body)
        deadline = time.time() + 10
        while requests.get(live.url + "/status", headers=AUTH, timeout=5).json()["active"] == 0:
            assert time.time() < deadline
            time.sleep(0.02)
        left = time.time()
        conn.close()
        assert live.idle(timeout=3), "the generation kept its slot after the client left"
        assert time.time() - left < 3 and live.engine.finished == ["cancelled"]
    finally:
        live.engine.pause = 0.0


def test_connections_beyond_the_limit_get_503_at_once(model, tokenizer):
    srv = LiveServer(Engine(model, tokenizer, static_cache=False), max_connections=3)
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(3)]
        time.sleep(0.2)
        assert requests.get(srv.url + "/health", timeout=5).status_code == 503
        for conn in idle:
            conn.close()
        deadline = time.time() + 5
        while requests.get(srv.url + "/health", timeout=5).status_code != 200:
            assert time.time() < deadline, "the server did not recover once the idle connections closed"
            time.sleep(0.05)
    finally:
        srv.stop()


# -- everything at once ------------------------------------------------------------------------


def test_a_mixed_burst_leaves_the_server_healthy_and_every_slot_free(model, tokenizer):
    engine = Wrapped(Engine(model, tokenizer))
    engine.enable_batching(slots=2, max_len=256)  # the continuous batcher, as on a GPU
    srv = LiveServer(engine, max_active=2, max_queue=24, body_timeout=1.0, queue_timeout=30, max_body_bytes=8192)
    try:

        def valid(i):
            extra = {"temperature": 0.8, "seed": i} if i % 2 else {"temperature": 0}
            r = srv.post(
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8, **extra},
            )
            return "valid", r.status_code

        def tiny_temperature(i):
            return "valid", srv.post(
                "/v1/completions", {"prompt": f"Item {i}", "max_tokens": 8, "temperature": 1e-38}
            ).status_code

        def huge_seed(i):
            return "seed", srv.post("/generate", {"prompt": "hi", "seed": 2**64 + i, "temperature": 1}).status_code

        def slow_body(i):
            return "slow", status_of(srv.raw(request_head("/generate", 100), b'{"prompt": '))

        def leaves(i):
            body = json.dumps(
                {"prompt": "The list", "max_tokens": 240, "temperature": 0.9, "stream": bool(i % 2)}
            ).encode()
            conn = srv.raw(request_head("/v1/completions", len(body)), body)
            time.sleep(0.2)
            conn.close()
            return "gone", 0

        calls = [f for i in range(4) for f in (valid, tiny_temperature, huge_seed, leaves, valid)] + [slow_body] * 3
        start = time.time()
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda fi: fi[1](fi[0]), enumerate(calls)))
        print(f"\nburst of {len(calls)} requests in {time.time() - start:.1f} s")
        codes = {kind: [c for k, c in results if k == kind] for kind in ("valid", "seed", "slow")}
        assert codes["valid"] == [200] * 12, codes
        assert codes["seed"] == [400] * 4 and codes["slow"] == [408] * 3, codes
        assert srv.idle(), requests.get(srv.url + "/status", headers=AUTH, timeout=5).json()
        assert engine.batcher.active == {} and engine.batcher.waiting.empty()
        assert max(engine.lengths) < 240, "a client that left had its generation run to the end"
        assert requests.get(srv.url + "/health", timeout=5).json() == {"status": "ok"}
        assert srv.post("/v1/completions", {"prompt": "after", "max_tokens": 4}).status_code == 200
        assert time.time() - start < 60
    finally:
        srv.stop()
