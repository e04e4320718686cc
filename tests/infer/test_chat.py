"""The chat REPL's commands and history, `generate`, API keys and the scheduler's bounds (no server)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.infer.auth import ApiKeys
from qlora_platform.infer.chat import chat_repl, generate_once, is_loopback
from qlora_platform.infer.engine import Engine
from qlora_platform.infer.sampling import SamplingParams
from qlora_platform.infer.scheduler import Scheduler


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tokenizer)


def run_repl(engine, lines, params=None, **kw):
    feed, out, err, prompts = iter(lines), [], [], []

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    real_encode = engine.encode_chat
    engine.encode_chat = lambda messages: prompts.append([dict(m) for m in messages]) or real_encode(messages)
    try:
        code = chat_repl(
            engine,
            params or SamplingParams(max_new_tokens=4, ignore_eos=True),
            read=read,
            write=out.append,
            err=err.append,
            **kw,
        )
    finally:
        engine.encode_chat = real_encode
    return code, "".join(out), err, prompts


def test_repl_streams_keeps_history_and_obeys_commands(engine):
    code, out, err, prompts = run_repl(
        engine, ["hello", "again", "/reset", "fresh", "/system Be brief.", "x", "/bogus", "/exit", "never read"]
    )
    assert code == 0
    assert [m["role"] for m in prompts[1]] == ["user", "assistant", "user"]  # multi-turn
    assert [m["content"] for m in prompts[2]] == ["fresh"]  # /reset forgot
    assert prompts[3][0] == {"role": "system", "content": "Be brief."}
    assert any("tokens/s" in e for e in err) and any("unknown command /bogus" in e for e in err)
    assert out.strip()


def test_repl_drops_old_turns_to_fit_the_context(engine):
    small = Engine(engine.model, engine.tokenizer, max_context=60)
    _, _, err, prompts = run_repl(small, ["a " * 10, "b " * 10, "c " * 10])
    assert all(len(small.encode_chat(p)) + 4 <= 60 for p in prompts[-1:])
    assert len(prompts[-1]) < 5  # oldest turns went
    _, _, err, _ = run_repl(small, ["word " * 80])
    assert any("over the context of 60" in e for e in err)


def test_generate_once_and_its_errors(engine):
    out, err = [], []
    assert (
        generate_once(engine, "Hi", SamplingParams(max_new_tokens=3, ignore_eos=True), write=out.append, err=err.append)
        == 0
    )
    assert "".join(out).strip() and "3 tokens" in err[0]
    with pytest.raises(UserError, match="--prompt is empty"):
        generate_once(engine, "  ", SamplingParams())


def test_api_keys_from_every_source(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-123456\n\n")
    monkeypatch.setenv("QLORA_API_KEYS", "env-key-1234567,env-key-7654321")
    keys = ApiKeys.gather(["cli-key-1234567"], str(key_file))
    assert len(keys) == 4
    for k in ["cli-key-1234567", "file-key-123456", "env-key-7654321"]:
        assert keys.allows({"authorization": f"Bearer {k}"}) and keys.allows({"x-api-key": k})
    assert not keys.allows({"authorization": "Bearer wrong-key-123"}) and not keys.allows({})
    with pytest.raises(UserError, match="at least 8 characters"):
        ApiKeys(["short"])
    with pytest.raises(UserError, match="does not exist"):
        ApiKeys.gather([], str(tmp_path / "missing"))
    monkeypatch.delenv("QLORA_API_KEYS")
    assert not ApiKeys.gather().enabled and ApiKeys.gather().allows({})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_scheduler_bounds_running_and_waiting_jobs():
    async def scenario():
        s = Scheduler(max_active=1, max_queue=1, queue_timeout=5)
        gate = threading.Event()
        first = s.submit(lambda job: (gate.wait(5), job.emit("a")))
        second = s.submit(lambda job: job.emit("b"))
        assert first and second and s.submit(lambda job: None) is None  # 1 running + 1 waiting: full
        gate.set()
        got = [item async for item in first.events()] + [item async for item in second.events()]
        assert got == ["a", "b"] and s.active == 0 and s.waiting == 0
        blocker = threading.Event()
        held = s.submit(lambda job: blocker.wait(5))
        queued = s.submit(lambda job: job.emit("never"))
        queued.cancel()  # a waiting client leaves
        assert [item async for item in queued.events()] == []
        blocker.set()
        assert [item async for item in held.events()] == []
        assert s.active == 0 and s.waiting == 0

    asyncio.run(scenario())


def test_health_is_503_while_loading_and_after_a_failed_load():
    from fastapi.testclient import TestClient

    from qlora_platform.infer.server import ServerSettings, create_app

    gate = threading.Event()

    class FakeLoaded:
        engine = None

    def slow_loader(**kw):
        gate.wait(10)
        return FakeLoaded()

    with TestClient(create_app(ServerSettings(model="m"), loader=slow_loader)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["Retry-After"]
        r = client.post("/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["Retry-After"]
        gate.set()
        for _ in range(100):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").json()["status"] == "ok"

    def broken_loader(**kw):
        raise UserError("model 'm' was not found")

    with TestClient(create_app(ServerSettings(model="m"), loader=broken_loader, load_in_background=False)) as client:
        assert client.get("/health").json() == {"status": "error"}
        assert "not found" in client.get("/status").json()["load_error"]
        err = client.post("/generate", json={"prompt": "hi"}).json()["error"]
        assert err["code"] == "model_load_failed" and "not found" in err["message"]


def test_the_banner_names_the_adapter_and_history_lives_in_a_file(engine, tmp_path, monkeypatch):
    from qlora_platform.infer import chat

    _, _, err, _ = run_repl(engine, ["/exit"], label="the adapter runs/x/final_adapter")
    assert err[0].startswith("chat with the adapter runs/x/final_adapter;")

    class Tty:
        def isatty(self):
            return True

    readline = pytest.importorskip("readline")
    history = tmp_path / "cache" / "chat_history"
    history.parent.mkdir()
    history.write_text("earlier question\n")
    monkeypatch.setattr(chat.sys, "stdin", Tty())
    saved = []
    monkeypatch.setattr("atexit.register", lambda fn: saved.append(fn))
    readline.clear_history()
    chat.line_editing(history)
    assert readline.get_history_item(1) == "earlier question"
    readline.add_history("new question")
    saved[0]()
    assert history.read_text().splitlines()[-1] == "new question"
