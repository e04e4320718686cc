"""`qlora push` against a stand-in for the Hub's HTTP API on loopback.

The stand-in answers the routes huggingface_hub calls for a push (whoami, repo info, create repo,
validate-yaml, preupload, commit), answers every file "regular" so its bytes come inline in the
NDJSON commit, and records each request: the tests check what would reach the Hub.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from qlora_platform.config import Config, dump_config
from qlora_platform.export.push import format_size, plan_push
from qlora_platform.models.model_card import hub_base_model
from tests.conftest import one_error_line, run_cli

TOKEN = "hf_standin_token_0123456789"
REPO = "alice/stdlib-assistant"
HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOCAL_BASE = "/home/alice/.cache/qlora-platform/models/smollm2-135m-instruct"
OID = "a" * 40


class StandInHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool}
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.fail: dict[str, tuple[int, str]] = {}  # route name -> (status, message)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        hub, path = self.server, self.path.split("?")[0]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub.requests.append({"method": method, "path": path, "auth": self.headers.get("Authorization")})
        parts = path.strip("/").split("/")
        name = {
            ("GET", "whoami-v2"): "whoami",
            ("POST", "validate-yaml"): "validate",
            ("POST", "repos"): "create",
        }.get((method, parts[1] if len(parts) > 1 else ""))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            name = {"GET": "info"}.get(method) if len(parts) == 4 else parts[4]
        if name in hub.fail:
            status, message = hub.fail[name]
            return self._reply(status, {"error": message})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        repo = "/".join(parts[2:4])
        if name == "whoami":
            return self._reply(200, {"name": "alice", "type": "user", "auth": {"accessToken": {"role": "write"}}})
        if name == "validate":
            yaml.safe_load(json.loads(body)["content"].split("---")[1])  # the front matter parses
            return self._reply(200, {"errors": [], "warnings": []})
        if name == "create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this model repo"})
            hub.created.append(payload)
            hub.repos[repo_id] = {"private": payload.get("visibility") == "private"}
            return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
        if repo not in hub.repos:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if name == "info":
            return self._reply(200, {"id": repo, "private": hub.repos[repo]["private"], "sha": OID})
        if name == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if name == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            hub.commits.append(
                {"repo": repo, "header": lines[0]["value"], "files": files, "keys": [i["key"] for i in lines]}
            )
            return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{OID}", "commitOid": OID})
        return self._reply(404, {"error": f"no route {method} {path}"})

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # huggingface_hub read HF_ENDPOINT at import; its own background calls use that copy.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    # Other tests may switch huggingface_hub to offline mode for the whole process.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()
    server.server_close()


EVAL = {
    "schema_version": 2,
    "created": "2026-12-03 10:00 UTC",
    "command": "qlora eval --adapter runs/demo/final_adapter",
    "model": "bundled:smollm2-135m-instruct",
    "adapter": "runs/demo/final_adapter",
    "run_dir": "runs/demo",
    "device": "cpu (2 threads)",
    "weights": "4-bit NF4",
    "perplexity": {
        "base": 9.8125,
        "tuned": 6.53125,
        "base_loss": 2.2836,
        "tuned_loss": 1.8766,
        "reduction_pct": 33.44,
        "tokens": 2417,
        "examples": 53,
        "eval_file": "/home/alice/data/eval.jsonl",
        "max_seq_len": 384,
        "method": "exp(mean NLL over assistant-answer tokens), token-weighted",
    },
    "keyword_pass_rate": {"base": 0.25, "tuned": 0.625},
    "keyword_benchmark": {"skipped": None, "name": "python-stdlib", "prompts": 8, "base_passed": 2, "tuned_passed": 5},
    "tokens_per_s": 17.1,
    "prompts": [],
    "plots": [],
}


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as training and `qlora eval` leave it, with a small adapter written by hand."""
    import torch
    from safetensors.torch import save_file

    run = tmp_path / "runs" / "demo"
    adapter = run / "final_adapter"
    adapter.mkdir(parents=True)
    cfg = Config.model_validate(
        {
            "model": {"name": "bundled:smollm2-135m-instruct"},
            "lora": {"r": 8, "alpha": 16},
            "data": {"train_file": "/home/alice/data/train.jsonl", "eval_file": "/home/alice/data/eval.jsonl"},
            "training": {"max_steps": 40, "learning_rate": 3e-4},
            "output": {"dir": str(run)},
        }
    )
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "train_summary.json").write_text(json.dumps({"steps": 40, "train_records": 474, "eval_perplexity": 6.53}))
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(EVAL))
    adapter_config = {
        "base_model_name_or_path": LOCAL_BASE,
        "lora_alpha": 16,
        "peft_type": "LORA",
        "r": 8,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    torch.manual_seed(0)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (adapter / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (adapter / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (adapter / "README.md").write_text("---\nlibrary_name: peft\n---\n\nthe trainer's card\n")
    # Training state has no place in a published adapter.
    (adapter / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    (adapter / "trainer_state.json").write_text("{}")
    return run


ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"}
EXPECTED = ADAPTER_FILES | {"chat_template.jinja", "README.md"}


def push(capsys, *argv):
    return run_cli(capsys, "push", *argv)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_sends_the_adapter_the_card_and_the_metrics(hub, run, capsys):
    code, out, err = push(capsys, "--adapter", str(run), "--repo", REPO, "--private", "--domain", "Python stdlib")
    assert code == 0, err
    assert hub.created == [
        {"name": "stdlib-assistant", "organization": "alice", "visibility": "private", "type": "model"}
    ]
    # huggingface_hub may also fetch its agent registry once a process; that call is not the push's.
    calls = [r for r in hub.requests if r["path"] != "/api/agent-harnesses"]
    assert [(r["method"], r["path"]) for r in calls] == [
        ("GET", "/api/whoami-v2"),
        ("GET", f"/api/models/{REPO}"),
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in calls)
    [commit] = hub.commits
    assert commit["repo"] == REPO and set(commit["keys"]) == {"header", "file"}
    assert set(commit["files"]) == EXPECTED  # no optimizer.pt, no trainer_state.json
    adapter = run / "final_adapter"
    for name in ("adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert commit["files"][name] == (adapter / name).read_bytes()
    # The local base path becomes the hub id, the rest of adapter_config.json stays as it was.
    sent_config = json.loads(commit["files"]["adapter_config.json"])
    local_config = json.loads((adapter / "adapter_config.json").read_text())
    assert sent_config["base_model_name_or_path"] == HUB_BASE
    assert {**sent_config, "base_model_name_or_path": LOCAL_BASE} == local_config

    card = commit["files"]["README.md"].decode()
    meta = front_matter(card)
    assert {"qlora", "fine-tuned", "peft", "lora", "python-stdlib"} <= set(meta["tags"])
    assert meta["base_model"] == HUB_BASE and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    [entry] = meta["model-index"]
    metrics = {m["name"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert metrics == {
        "holdout perplexity": EVAL["perplexity"]["tuned"],
        "holdout perplexity (base model)": EVAL["perplexity"]["base"],
        "keyword pass rate": EVAL["keyword_pass_rate"]["tuned"],
        "keyword pass rate (base model)": EVAL["keyword_pass_rate"]["base"],
    }
    # huggingface_hub reads the model-index back into evaluation results.
    from huggingface_hub.repocard_data import model_index_to_eval_results

    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "stdlib-assistant" and [r.metric_value for r in results][:2] == [6.53125, 9.8125]
    for text in (
        "| method | sft |",
        "r=8, alpha=16",
        "| learning rate | 0.0003",
        "| steps | 40 ",
        "| max_seq_len | 384",
    ):
        assert text in card, text
    assert "| holdout perplexity | 9.812 | 6.531 (33.4% lower) |" in card
    assert "| keyword pass rate | 25.0% | 62.5% |" in card
    assert f'AutoPeftModelForCausalLM.from_pretrained("{REPO}")' in card and "qlora chat --adapter" in card
    assert "/home/alice" not in card  # no path of the training machine
    for name in EXPECTED:
        assert f"  {name} (" in out
    assert "pushed 6 files" in out


def test_dry_run_sends_nothing_and_needs_no_token(hub, run, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(2000))
    (gguf / "Modelfile").write_text("FROM ./model-Q4_K_M.gguf\n")
    code, out, err = push(capsys, "--adapter", str(run), "--repo", REPO, "--dry-run", "--gguf", str(gguf))
    assert code == 0, err
    assert hub.requests == []
    assert f"repo: {REPO}" in out and "visibility: public" in out
    plan = plan_push(run, REPO, gguf=gguf)
    paths = [f.path_in_repo for f in plan.files]
    assert set(paths) == EXPECTED | {"gguf/model-Q4_K_M.gguf", "gguf/Modelfile"}
    for f in plan.files:
        line = next(line for line in out.splitlines() if line.startswith(f"  {f.path_in_repo} "))
        assert format_size(f.size) in line
    assert next(f for f in plan.files if f.path_in_repo == "gguf/model-Q4_K_M.gguf").size == 2004
    assert "left out (training state): optimizer.pt, trainer_state.json" in out
    assert plan.card.strip() in out and "qlora chat --gguf stdlib-assistant/gguf/model-Q4_K_M.gguf" in out


def test_a_missing_token_is_one_line(hub, run, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = push(capsys, "--adapter", str(run), "--repo", REPO)
    assert code == 2 and hub.requests == []
    assert one_error_line(err) == (
        f"error: no Hugging Face token: set HF_TOKEN or run 'hf auth login' (write access to {REPO})"
    )


def test_an_existing_repo_needs_overwrite(hub, run, capsys):
    hub.repos[REPO] = {"private": False}
    code, _, err = push(capsys, "--adapter", str(run), "--repo", REPO)
    assert code == 2 and "already exists" in one_error_line(err) and "--overwrite" in err
    assert hub.commits == [] and hub.created == []
    code, out, err = push(capsys, "--adapter", str(run / "final_adapter"), "--repo", REPO, "--overwrite")
    assert code == 0, err
    assert hub.created == [] and len(hub.commits) == 1 and set(hub.commits[0]["files"]) == EXPECTED


@pytest.mark.parametrize(
    ("route", "status", "expected"),
    [
        ("commit", 403, "the hub refused the token (403): it lacks write access to alice/stdlib-assistant"),
        ("create", 401, "the hub refused the token (401): it lacks write access"),
        ("commit", 500, "the hub answered 500 to the commit to alice/stdlib-assistant: storage is down"),
        ("info", 400, "the hub answered 400 to the repo info of alice/stdlib-assistant: storage is down"),
    ],
)
def test_hub_errors_are_one_line(hub, run, capsys, route, status, expected):
    hub.fail[route] = (status, "storage is down")
    code, _, err = push(capsys, "--adapter", str(run), "--repo", REPO)
    assert code == 2 and expected in one_error_line(err)


def test_a_bad_repo_id_or_adapter_is_one_line(hub, run, capsys, tmp_path):
    code, _, err = push(capsys, "--adapter", str(run), "--repo", "no-namespace", "--dry-run")
    assert code == 2 and "write USER/NAME" in one_error_line(err)
    code, _, err = push(capsys, "--adapter", str(tmp_path), "--repo", REPO, "--dry-run")
    assert code == 2 and "not a LoRA adapter folder" in one_error_line(err)
    code, _, err = push(capsys, "--adapter", str(run), "--repo", REPO, "--gguf", str(tmp_path / "none"))
    assert code == 2 and "--gguf" in one_error_line(err)
    assert hub.requests == []


def test_only_hub_models_become_the_cards_base_model(tmp_path):
    assert hub_base_model("bundled:smollm2-135m-instruct") == HUB_BASE
    assert hub_base_model("mistralai/Mistral-7B-Instruct-v0.3") == "mistralai/Mistral-7B-Instruct-v0.3"
    assert hub_base_model(str(tmp_path)) is None
    assert hub_base_model("/models/x.gguf") is None


def test_a_checkpoint_goes_without_training_state_and_with_its_own_step_count(run):
    import shutil

    checkpoint = run / "checkpoint-20"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        shutil.copy(run / "final_adapter" / name, checkpoint / name)
    (checkpoint / "rng_state.pt").write_bytes(b"x")
    plan = plan_push(checkpoint, REPO)
    assert [f.path_in_repo for f in plan.files] == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert plan.left_out == ["optimizer.pt", "rng_state.pt", "trainer_state.json"]
    assert "| steps | 20 " in plan.card and "model-index" not in plan.card  # eval.json scores final_adapter
    assert f'AutoTokenizer.from_pretrained("{HUB_BASE}")' in plan.card
    assert any("scores final_adapter, not checkpoint-20" in n for n in plan.notes)


def test_an_adapter_without_its_run_names_its_own_hub_base(run, tmp_path):
    import shutil

    alone = tmp_path / "alone"
    shutil.copytree(run / "final_adapter", alone)
    config = json.loads((alone / "adapter_config.json").read_text())
    (alone / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": HUB_BASE}))
    plan = plan_push(alone, REPO)
    sent = next(f for f in plan.files if f.path_in_repo == "adapter_config.json")
    assert sent.content is None and sent.source == alone / "adapter_config.json"  # sent unchanged
    assert front_matter(plan.card)["base_model"] == HUB_BASE and "model-index" not in plan.card
    assert any("no run config.yaml" in n for n in plan.notes)


def test_a_broken_adapter_config_is_one_line(run, capsys):
    (run / "final_adapter" / "adapter_config.json").write_text("{not json")
    code, _, err = push(capsys, "--adapter", str(run), "--repo", REPO, "--dry-run")
    assert code == 2 and "adapter_config.json is not readable JSON" in one_error_line(err)
