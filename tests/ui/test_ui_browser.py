"""`qlora ui` in a real browser: headless Chromium driven by Playwright against the UI on loopback.

One walk through the tabs as a person makes it, on the bundled SmolLM2: prepare the sample
set, train a few steps and watch the loss plot fill, evaluate, chat one turn beside the
base model, export a GGUF and see it offered for download. Each tab is photographed; with
QLORA_UI_SCREENSHOTS=docs/images the pictures are the ones the docs show.

Chromium is Debian's package (`apt-get install chromium`; .ci/run installs it); Playwright's
own browser download is not used. Without a Chromium the test is skipped, except under CI,
where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from qlora_platform.eval.keywords import DEFAULT_PROMPTS

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("QLORA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps calling Google's hosts, which this
# closed network refuses; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# A run that takes seconds on 2 cores: the bundled model, short rows, a loss point every step.
UI_CONFIG = """\
model:
  name: bundled:smollm2-135m-instruct
data:
  train_file: data/train.jsonl
  eval_file: data/eval-small.jsonl
  max_seq_len: 128
training:
  max_steps: 6
  batch_size: 2
  logging_steps: 1
  save_steps: 3
  gradient_checkpointing: false
output:
  dir: runs/ui
"""
MINUTES = 60_000  # Playwright timeouts are in milliseconds


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("no Chromium: .ci/run installs Debian's chromium package; install it or set QLORA_CHROMIUM")
        pytest.skip("no Chromium here (apt-get install chromium, or set QLORA_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "workspace"
    (ws / "configs").mkdir(parents=True)
    (ws / "configs" / "ui-test.yaml").write_text(UI_CONFIG)
    return ws


def shots_dir(tmp_path: Path) -> Path:
    target = os.environ.get("QLORA_UI_SCREENSHOTS")
    folder = Path(target) if target else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def status_reads(page, text: str, timeout: int) -> None:
    page.wait_for_function(
        "t => (document.querySelector('#job-status') || {}).innerText?.includes(t)", arg=text, timeout=timeout
    )


def pick(page, elem_id: str, option: str) -> None:
    """Choose `option` in a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def settled(page, selector: str, quiet_s: float = 3.0, limit_s: float = 300.0) -> None:
    """Wait until the text of `selector` stops changing (a streamed answer is complete)."""
    last, since, deadline = None, time.time(), time.time() + limit_s
    while time.time() < deadline:
        text = page.inner_text(selector)
        if text != last:
            last, since = text, time.time()
        elif time.time() - since >= quiet_s:
            return
        time.sleep(0.5)
    raise AssertionError(f"{selector} kept changing for {limit_s} s")


def test_the_pipeline_in_a_browser(chromium, workspace, tmp_path, start_ui):
    shots = shots_dir(tmp_path)
    url = start_ui(workspace).url
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url)

    # Data: a path outside the workspace is refused with one line; the sample set is prepared and
    # validated by the CLI as a job.
    page.get_by_label("a file or folder in the workspace").check()
    page.fill("#data-path textarea", "/etc")
    page.click("#prepare")
    page.get_by_text("input: '/etc' is outside the workspace").wait_for()
    assert not (workspace / ".qlora-ui" / "jobs").exists() or not any((workspace / ".qlora-ui" / "jobs").iterdir())
    page.get_by_label("the sample set").check()
    page.click("#prepare")
    page.wait_for_function(
        "() => document.querySelector('#data-report').innerText.includes('Validation report')",
        timeout=5 * MINUTES,
    )
    assert "1124 records" in page.inner_text("#data-report")
    assert (workspace / "data" / "train.jsonl").is_file()
    # a small holdout and benchmark keep the Evaluate step to a minute on 2 cores
    lines = (workspace / "data" / "eval.jsonl").read_text().splitlines()[:8]
    (workspace / "data" / "eval-small.jsonl").write_text("\n".join(lines) + "\n")
    bench = json.loads(Path(DEFAULT_PROMPTS).read_text())
    bench["prompts"], bench["generation"]["max_new_tokens"] = bench["prompts"][:4], 48
    (workspace / "bench-small.json").write_text(json.dumps(bench))
    page.screenshot(path=str(shots / "ui-data.png"), full_page=True)

    # Train: the preset's form, the command it means, the memory pre-flight, a live loss plot.
    page.get_by_role("tab", name="Train").click()
    pick(page, "preset", "configs/ui-test.yaml")
    page.wait_for_function("() => document.querySelector('#train-command').innerText.includes('configs/ui-test.yaml')")
    page.fill("#f-training-learning-rate input", "0.0003")
    page.locator("#f-training-learning-rate input").blur()
    page.wait_for_function(
        "() => document.querySelector('#train-command').innerText.includes('--training.learning_rate 0.0003')"
    )
    empty_plot = page.locator("#loss-plot").screenshot()
    assert page.inner_text("#loss-summary .prose").strip() == "No training run yet."
    page.click("#train-start")
    page.wait_for_function(
        "() => document.querySelector('#preflight textarea').value.includes('GiB')", timeout=2 * MINUTES
    )
    # Stop once the plot has its first points, while the run is going; Resume finishes it.
    page.wait_for_function(
        "() => /train loss .* at step [2-5]$/.test(document.querySelector('#loss-summary .prose').innerText.trim())",
        timeout=5 * MINUTES,
    )
    assert page.inner_text("#job-progress-text").startswith("training: ")
    page.click("#job-stop")
    status_reads(page, "train: stopped", 2 * MINUTES)
    assert any((workspace / "runs/ui").glob("checkpoint-*")), "the stop saved no checkpoint"
    page.click("#train-resume")
    status_reads(page, "train: done", 10 * MINUTES)
    page.wait_for_function(
        "() => document.querySelector('#loss-summary .prose').innerText.includes('at step 6')", timeout=30_000
    )
    assert page.locator("#loss-plot").screenshot() != empty_plot
    log = [json.loads(line) for line in (workspace / "runs/ui/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once across the stop
    assert "--resume" in page.inner_text("#job-status")
    assert (workspace / "runs/ui/final_adapter/adapter_config.json").is_file()
    page.screenshot(path=str(shots / "ui-train.png"), full_page=True)

    # Evaluate: qlora eval on the small holdout, its report in the page.
    page.get_by_role("tab", name="Evaluate").click()
    pick(page, "eval-adapter", "runs/ui/final_adapter")
    page.fill("#eval-prompts textarea", "bench-small.json")
    page.fill("#eval-speed input", "1")
    page.click("#eval-start")
    status_reads(page, "eval: done", 10 * MINUTES)
    page.wait_for_function(
        "() => document.querySelector('#eval-report').innerText.includes('holdout perplexity')", timeout=30_000
    )
    assert "/4)" in page.inner_text("#eval-report")  # the keyword pass rate of the 4 prompts
    plots = page.locator("#eval-report img")
    assert plots.count() == 3
    for i in range(3):  # served from the workspace: each one loads
        plots.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=plots.nth(i).element_handle())
    page.screenshot(path=str(shots / "ui-evaluate.png"), full_page=True)

    # Chat: one turn, the tuned answer and the base model's side by side.
    page.get_by_role("tab", name="Chat").click()
    pick(page, "chat-adapter", "runs/ui/final_adapter")
    page.fill("#chat-message textarea", "What does json.dumps do?")
    page.click("#chat-send")
    base_answer = "#chat-base [data-testid='bot']"
    page.wait_for_function(
        "s => (document.querySelector(s) || {}).innerText?.trim()", arg=base_answer, timeout=5 * MINUTES
    )
    settled(page, base_answer)
    assert page.inner_text("#chat-tuned [data-testid='user']").strip() == "What does json.dumps do?"
    assert page.inner_text("#chat-tuned [data-testid='bot']").strip()
    page.screenshot(path=str(shots / "ui-chat.png"), full_page=True)
    # a second turn (the conversation goes back to the model as text), the tuned model alone
    page.get_by_label("base model side by side").uncheck()
    page.fill("#chat-message textarea", "And json.loads?")
    page.click("#chat-send")
    page.wait_for_function(
        "() => document.querySelectorAll(\"#chat-tuned [data-testid='bot']\").length == 2", timeout=5 * MINUTES
    )
    settled(page, "#chat-tuned")
    assert page.locator("#chat-tuned [data-testid='bot']").nth(1).inner_text().strip()
    assert page.locator("#chat-base [data-testid='bot']").count() == 1

    # Export: a Q8_0 GGUF, then offered for download.
    page.get_by_role("tab", name="Export").click()
    pick(page, "export-adapter", "runs/ui/final_adapter")
    page.locator("#quants").get_by_label("Q4_K_M").uncheck()
    page.locator("#quants").get_by_label("Q8_0").check()
    page.locator("#export-quality").get_by_role("checkbox").uncheck()
    page.click("#export-start")
    status_reads(page, "export: done", 15 * MINUTES)
    page.wait_for_function("() => document.querySelector('#export-report').innerText.includes('Q8_0')", timeout=30_000)
    ggufs = sorted(p.name for p in (workspace / "exports" / "ui").glob("*.gguf"))
    assert any("Q8_0" in name for name in ggufs), ggufs
    offered = "".join(page.locator("#export-files").inner_text().split())  # names wrap at the dot
    assert all(name in offered for name in ggufs), offered
    link = page.locator("#export-files a").first.get_attribute("href")
    assert link and page.request.get(link).ok  # the download is served (from exports/, no copy)
    page.screenshot(path=str(shots / "ui-export.png"), full_page=True)

    # A reload finds the last job, its log and the run's loss curve where they were.
    page.reload()
    status_reads(page, "export: done", 30_000)
    page.get_by_role("tab", name="Train").click()
    assert "at step 6" in page.inner_text("#loss-summary .prose")
