"""Retrieval through a real Chroma server (`chroma run`, started here on loopback): index, query,
`qlora chat --rag URL` answering with its sources, and a server that went away as one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from qlora_platform.cli import main
from tests.infer.conftest import free_port

pytestmark = pytest.mark.slow


def chroma_cli() -> str:
    beside = Path(sys.executable).with_name("chroma")
    found = str(beside) if beside.is_file() else shutil.which("chroma")
    if not found:
        pytest.fail("the chroma command (chromadb's server) is missing: pip install 'qlora-platform[rag]'")
    return found


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    port = free_port()
    path = tmp_path_factory.mktemp("chroma-server")
    proc = subprocess.Popen(
        [chroma_cli(), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chroma run exited with {proc.returncode}")
            try:
                if requests.get(f"{url}/api/v2/heartbeat", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail("chroma run did not answer within 60 s")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(20)


def test_index_and_query_through_the_server(chroma_server, sample_docs, capsys):
    url, _ = chroma_server
    assert main(["rag", "index", "--input", str(sample_docs), "--chroma-url", url]) == 0
    out = capsys.readouterr().out
    assert "indexed 'docs' at http://127.0.0.1" in out and "4 file(s) read and embedded" in out
    assert main(["rag", "index", "--input", str(sample_docs), "--chroma-url", url]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert main(["rag", "query", "--chroma-url", url, "How", "do", "I", "use", "`shlex.split`?", "--json"]) == 0
    import json

    passages = json.loads(capsys.readouterr().out)
    assert len(passages) == 5 and passages[0]["heading"] == "shlex.split" and passages[0]["n"] == 1
    assert passages[0]["source"].endswith("shlex.html") and passages[0]["similarity"] is not None


def test_chat_answers_with_its_sources(chroma_server, sample_docs):
    url, _ = chroma_server
    assert main(["rag", "index", "--input", str(sample_docs), "--chroma-url", url]) == 0
    chat = subprocess.run(
        [sys.executable, "-m", "qlora_platform.cli", "chat", "--model", "bundled:smollm2-135m-instruct"]
        + ["--device", "cpu", "--rag", url, "--temperature", "0", "--max-tokens", "24"],
        input="What does shlex.split do?\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "retrieval from http://127.0.0.1" in chat.stderr
    sources = chat.stdout[chat.stdout.index("sources:") :].splitlines()
    assert sources[1].startswith("  [1] ") and "shlex.html § shlex.split" in sources[1]
    print("\n" + chat.stdout)


def test_a_server_that_went_away_is_one_line(chroma_server, capsys):
    url, proc = chroma_server
    proc.terminate()
    proc.wait(20)
    assert main(["rag", "query", "--chroma-url", url, "anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot reach the Chroma server at {url}") and "\n" not in err
