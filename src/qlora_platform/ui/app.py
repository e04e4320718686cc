"""`qlora ui`: the whole pipeline in a browser, on Gradio.

Five tabs, Data -> Train -> Evaluate -> Chat -> Export, over one workspace folder. The
long work of each tab is the CLI itself run as a job (ui/jobs.py): the tab builds the
`qlora ...` command, shows it, and the job panel under the tabs follows its progress and
log, and stops it. The Train form is generated from the config schema (ui/forms.py) and
checks memory with the same estimate as `qlora train --dry-run`; Chat loads the adapter in
the UI process (ui/chat.py). The page keeps no state of its own: a reload finds the
running job, its log and its loss curve where they were.

Safe by default: it binds 127.0.0.1, logs in with --auth USER:PASS (or $QLORA_UI_AUTH),
serves and reads files only inside the workspace, and caps uploads (--max-upload-mb).
"""

from __future__ import annotations

import base64
import fcntl
import hmac
import html
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PATH_KEYS, load_config
from ..errors import UserError
from ..infer.sampling import CHAT_DEFAULTS
from .chat import ChatModels
from .forms import AUTO, COMMON, command_line, fields, overrides, preset_values, to_widget, train_argv
from .jobs import JobRunner, last_error, progress, read_log
from .workspace import Workspace

QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
EXPORTS = "exports"  # the folder exports are written to, and the only one whose files the UI serves
DEFAULTS = "(schema defaults)"  # the preset choice for no file
SAMPLE, UPLOAD, IN_WORKSPACE = "the sample set", "a file I upload", "a file or folder in the workspace"
# The config keys that name files or folders; each must stay inside the workspace.
PATH_FIELDS = tuple(f"{section}.{key}" for section, key in PATH_KEYS)
NO_FIT = "GiB free: does NOT fit"  # the estimate's verdict for the GPU present (train/dry_run.py)


@dataclass
class Options:
    workspace: Workspace
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    device: str = "auto"  # of the Chat tab's model


def _gr():
    try:
        import gradio as gr
    except ImportError:
        raise UserError("qlora ui needs Gradio: pip install 'qlora-platform[ui]'") from None
    return gr


def _error_box(err: Exception) -> str:
    return f"**error:** {html.escape(str(err))}"


class App:
    """The state the tabs share: the workspace, its job runner and the chat model."""

    def __init__(self, options: Options):
        self.ws = options.workspace
        self.chat = ChatModels(options.device)
        self.jobs = JobRunner(self.ws, before_start=self.chat.release)
        self.fields = fields()

    # -- paths ----------------------------------------------------------------------------
    def adapter(self, value: str | None) -> str:
        if not value:
            raise UserError("pick an adapter (train a run first: its final_adapter appears here)")
        path = self.ws.path(value, "adapter")
        if not (path / "adapter_config.json").is_file():
            raise UserError(
                f"adapter: '{value}' holds no adapter_config.json; pick a run's final_adapter or checkpoint"
            )
        return self.ws.rel(path)

    def run_of(self, adapter: str) -> Path:
        return self.ws.path(adapter).parent

    # -- Data -----------------------------------------------------------------------------
    def prepare(self, source: str, upload: str | None, path: str, doc_mode: str, eval_ratio: float, out_dir: str):
        out = self.ws.rel(self.ws.path(out_dir or "data", "output folder"))
        eval_ratio = 0.1 if eval_ratio is None else eval_ratio
        argv = ["prepare", "--out-dir", out, "--eval-ratio", str(eval_ratio)]
        if source == SAMPLE:
            argv.append("--sample")
        elif source == UPLOAD:
            if not upload:
                raise UserError("no file uploaded; drop a JSONL/CSV/PDF/HTML/TXT/MD file on the upload box first")
            argv += ["--input", self.ws.rel(self.ws.save_upload(upload)), "--doc-mode", doc_mode]
        else:
            target = self.ws.path(path, "input")
            if not target.exists():
                raise UserError(f"input: '{path}' does not exist in the workspace {self.ws.root}")
            argv += ["--input", self.ws.rel(target), "--doc-mode", doc_mode]
        validate = ["validate", f"{out}/train.jsonl"] + (["--eval", f"{out}/eval.jsonl"] if eval_ratio else [])
        return self.jobs.start("data", [argv, validate], {"out": out})

    def data_report(self) -> str:
        job = self.jobs.latest("data")
        if job is None:
            return "Nothing prepared in this session yet."
        text = read_log(job.log)
        if job.status != "done":
            return f"**{job.status}**" + (f": {html.escape(last_error(text) or '')}" if job.status == "failed" else "")
        report = text.split("$ qlora validate", 1)[-1].split("\n", 1)[-1].strip()
        return f"Prepared into `{job.meta['out']}/`. Validation report:\n\n```\n{report}\n```"

    # -- Train ----------------------------------------------------------------------------
    def preset_path(self, preset: str | None) -> str | None:
        if not preset or preset == DEFAULTS:
            return None
        return self.ws.rel(self.ws.path(preset, "preset"))

    def form_values(self, preset: str | None) -> list[Any]:
        values = preset_values(self.preset_path(preset))
        return [to_widget(f, values[f.key]) for f in self.fields]

    def train_plan(self, preset: str | None, values: list[Any], resume=False, overwrite=False):
        """(the `qlora train` arguments, the config they give) for the form; paths must stay in the workspace."""
        path = self.preset_path(preset)
        changed = overrides(path, {f.key: v for f, v in zip(self.fields, values)})
        for key in PATH_FIELDS:
            if key in changed and changed[key] != "null":
                changed[key] = self.ws.rel(self.ws.path(changed[key], key))
        cfg = load_config(path, changed)
        for key in PATH_FIELDS:  # the preset's own paths too
            section, _, leaf = key.partition(".")
            value = getattr(getattr(cfg, section), leaf)
            if value:
                self.ws.path(value, key)
        name = cfg.model.name  # a hub id or bundled:NAME, or a local folder or .gguf, which must be in the workspace
        if name.startswith(("/", ".", "~")) or name.endswith(".gguf") or (self.ws.root / name).exists():
            self.ws.path(name, "model.name")
        return train_argv(path, changed, resume, overwrite), cfg

    def preflight(self, preset: str | None, values: list[Any]) -> str:
        from ..train.dry_run import preflight

        return preflight(self.train_plan(preset, values)[1])

    def start_train(self, preset: str | None, values: list[Any], resume: bool, overwrite: bool, estimate: str = ""):
        """Start the run; refused when the memory estimate says it does not fit the GPU's free memory."""
        if NO_FIT in estimate:
            raise UserError(
                "the memory estimate says this run does NOT fit the GPU's free memory (see the pre-flight); lower "
                "training.batch_size or data.max_seq_len, or tick 'start even if it does not fit'"
            )
        argv, cfg = self.train_plan(preset, values, resume, overwrite and not resume)
        return self.jobs.start("train", [argv], {"run": self.ws.rel(self.ws.path(cfg.output.dir, "output.dir"))})

    def loss_frame(self):
        """Train and holdout loss by step of the newest training job's run (read as it is written)."""
        import pandas as pd

        job = self.jobs.latest("train")
        run = job.meta["run"] if job else None
        rows = []
        if run:
            log = self.ws.path(run) / "train_log.jsonl"
            if log.is_file():
                for line in log.read_text(encoding="utf-8").splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line being written
                    if "loss" in record:
                        rows.append({"step": record["step"], "loss": record["loss"], "series": "train"})
                    if "eval_loss" in record:
                        rows.append({"step": record["step"], "loss": record["eval_loss"], "series": "holdout"})
        return pd.DataFrame(rows, columns=["step", "loss", "series"])

    # -- Evaluate -------------------------------------------------------------------------
    def start_eval(self, adapter: str | None, eval_file: str, prompts: str = "", speed_runs: float = 3):
        adapter = self.adapter(adapter)
        argv = ["eval", "--adapter", adapter, "--speed-runs", str(int(speed_runs or 3))]
        if eval_file.strip():
            argv += ["--eval-file", self.ws.rel(self.ws.path(eval_file, "holdout file"))]
        if prompts.strip():
            argv += ["--prompts", self.ws.rel(self.ws.path(prompts, "benchmark prompts"))]
        return self.jobs.start("eval", [argv], {"report": self.ws.rel(self.run_of(adapter) / "eval")})

    def eval_report(self, adapter: str | None) -> str:
        """The run's eval.md with its plots inline (no file of the workspace needs serving for them)."""
        if not adapter:
            return "Pick an adapter; its run's report shows here once evaluated."
        folder = self.run_of(self.adapter(adapter)) / "eval"
        page = folder / "eval.md"
        if not page.is_file():
            return f"`{self.ws.rel(folder.parent)}` has no evaluation yet: press **Run evaluation**."

        def inline(link: re.Match) -> str:
            image = folder / link[2]
            if not image.is_file():
                return link[0]
            return f"![{link[1]}](data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()})"

        return re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", inline, page.read_text(encoding="utf-8"))

    def compare(self, runs: list[str]) -> str:
        from ..eval.compare import compare_runs

        if not runs:
            return "Pick two or more runs."
        markdown, _ = compare_runs([str(self.ws.path(r, "run")) for r in runs])
        return markdown

    # -- Export ---------------------------------------------------------------------------
    def start_export(self, adapter: str | None, quants: list[str], out: str, quality: bool):
        adapter = self.adapter(adapter)
        if not quants:
            raise UserError("pick at least one quantization (Q4_K_M is the usual choice)")
        folder_path = self.ws.path(out or f"{EXPORTS}/{self.run_of(adapter).name}", "output folder")
        if not folder_path.is_relative_to(self.ws.root / EXPORTS) or folder_path == self.ws.root / EXPORTS:
            raise UserError(f"output folder: '{out}' is not a folder under {EXPORTS}/ (exports are served from there)")
        folder = self.ws.rel(folder_path)
        argv = ["export", "gguf", "--adapter", adapter, "--out", folder]
        for quant in quants:
            argv += ["--quant", quant]
        if not quality:
            argv.append("--no-quality")
        return self.jobs.start("export", [argv], {"out": folder})

    def export_result(self) -> tuple[str, list[str]]:
        job = self.jobs.latest("export")
        if job is None or job.status != "done":
            return ("" if job is None else f"**{job.status}**"), []
        folder = self.ws.path(job.meta["out"])
        report = folder / "export_report.md"
        text = report.read_text(encoding="utf-8") if report.is_file() else f"Exported into `{job.meta['out']}`."
        return text, [str(p) for p in self.ws.gguf_files(folder)]

    # -- the job panel --------------------------------------------------------------------
    def job_view(self) -> tuple[str, str, str]:
        """(status line, progress bar HTML, log) of the current or last job."""
        job = self.jobs.current()
        if job is None:
            return "No job yet.", "", ""
        text = read_log(job.log)
        status = job.describe()
        if job.status in ("failed", "stopped") and last_error(text):  # the reason, or where the stop saved
            status += f"\n\n**{html.escape(last_error(text) or '')}**"
        bar = progress(text)
        bar_html = ""
        if bar:
            desc, done, total = bar
            bar_html = (
                f'<div id="job-progress-text">{html.escape(desc)}: {done}/{total}</div>'
                f'<progress value="{done}" max="{total}" style="width:100%"></progress>'
            )
        return status, bar_html, text


def build(options: Options):
    """The Gradio Blocks of the UI (not launched)."""
    gr = _gr()
    app = App(options)
    ws = app.ws

    def guarded(fn):
        """Run `fn`; a UserError shows as Gradio's error toast with its one line, never a traceback."""

        def wrapper(*args):
            try:
                return fn(*args)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None

        wrapper.__name__ = fn.__name__
        return wrapper

    def guarded_stream(fn):
        """`guarded` for a generator (Gradio streams what it yields)."""

        def wrapper(*args):
            try:
                yield from fn(*args)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None

        wrapper.__name__ = fn.__name__
        return wrapper

    with gr.Blocks(title="qlora-platform", analytics_enabled=False) as demo:
        gr.Markdown(f"# qlora-platform\nWorkspace: `{ws.root}`")
        with gr.Tabs():
            # -- Data ---------------------------------------------------------------------
            with gr.Tab("Data", id="data"):
                gr.Markdown("Turn raw data into chat JSONL (`qlora prepare`), then check it (`qlora validate`).")
                source = gr.Radio([SAMPLE, UPLOAD, IN_WORKSPACE], value=SAMPLE, label="source", elem_id="data-source")
                upload = gr.File(label=f"upload (up to {ws.max_upload_mb} MB)", type="filepath", visible=False)
                in_ws = gr.Textbox(
                    label="path in the workspace",
                    placeholder="docs/ or raw/manual.pdf",
                    visible=False,
                    elem_id="data-path",
                )
                with gr.Row():
                    doc_mode = gr.Dropdown(["qa", "text"], value="qa", label="documents become")
                    eval_ratio = gr.Number(0.1, label="holdout share", minimum=0.0, maximum=0.5)
                    out_dir = gr.Textbox("data", label="output folder")
                prepare_btn = gr.Button("Prepare", variant="primary", elem_id="prepare")
                data_md = gr.Markdown(app.data_report(), elem_id="data-report")

            # -- Train --------------------------------------------------------------------
            with gr.Tab("Train", id="train"):
                presets = [DEFAULTS, *ws.presets()]
                first = "configs/demo.yaml" if "configs/demo.yaml" in presets else presets[0]
                preset = gr.Dropdown(presets, value=first, label="preset", elem_id="preset")
                values = app.form_values(first)
                inputs: list = []
                common = [f for f in app.fields if f.key in COMMON]
                rest = [f for f in app.fields if f.key not in COMMON]

                def widget(f, value):
                    eid = "f-" + f.key.replace(".", "-").replace("_", "-")
                    if f.kind == "choice":
                        return gr.Dropdown(list(f.choices), value=value, label=f.label, info=f.help, elem_id=eid)
                    if f.kind == "switch" and f.optional:
                        return gr.Dropdown(
                            [AUTO, "true", "false"], value=value, label=f.label, info=f.help, elem_id=eid
                        )
                    if f.kind == "switch":
                        return gr.Checkbox(value=value, label=f.label, info=f.help, elem_id=eid)
                    if f.kind in ("int", "float"):
                        return gr.Number(
                            value, label=f.label, info=f.help, precision=0 if f.kind == "int" else None, elem_id=eid
                        )
                    if f.kind == "list":
                        return gr.CheckboxGroup(list(f.choices), value=value, label=f.label, info=f.help, elem_id=eid)
                    return gr.Textbox(value, label=f.label, info=f.help, elem_id=eid)

                by_key = {}
                for row in range(0, len(common), 3):
                    with gr.Row():
                        for f in common[row : row + 3]:
                            by_key[f.key] = widget(f, values[app.fields.index(f)])
                sections: dict[str, list] = {}
                for f in rest:
                    sections.setdefault(f.key.split(".")[0], []).append(f)
                for section, items in sections.items():
                    with gr.Accordion(f"{section}: more keys", open=False):
                        for f in items:
                            by_key[f.key] = widget(f, values[app.fields.index(f)])
                inputs = [by_key[f.key] for f in app.fields]
                with gr.Row():
                    with gr.Column(scale=1, min_width=200):
                        overwrite = gr.Checkbox(False, label="start again if output.dir holds a run (deletes it)")
                        force = gr.Checkbox(False, label="start even if the estimate says it does not fit")
                    check_btn = gr.Button("Check memory", elem_id="check-memory")
                    start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                    resume_btn = gr.Button("Resume", elem_id="train-resume")
                command = gr.Code(label="the same run from a terminal", language="shell", elem_id="train-command")
                preflight_box = gr.Textbox(label="memory pre-flight", lines=4, elem_id="preflight")
                loss_plot = gr.LinePlot(
                    app.loss_frame(), x="step", y="loss", color="series", title="loss", elem_id="loss-plot"
                )
                loss_md = gr.Markdown(loss_summary(app.loss_frame()), elem_id="loss-summary")

            # -- Evaluate -------------------------------------------------------------------
            with gr.Tab("Evaluate", id="evaluate"):
                gr.Markdown("Base against tuned on the holdout (`qlora eval`): perplexity, keyword benchmark, speed.")
                with gr.Row():
                    eval_adapter = gr.Dropdown(
                        ws.adapters(), label="adapter", elem_id="eval-adapter", allow_custom_value=True
                    )
                    eval_file = gr.Textbox("", label="holdout file (blank: the run's)", elem_id="eval-file")
                    eval_prompts = gr.Textbox(
                        "", label="benchmark prompts (blank: the sample domain's)", elem_id="eval-prompts"
                    )
                    speed_runs = gr.Number(3, label="timed generations", precision=0, minimum=1, elem_id="eval-speed")
                eval_btn = gr.Button("Run evaluation", variant="primary", elem_id="eval-start")
                eval_md = gr.Markdown(elem_id="eval-report")
                gr.Markdown("### Compare runs")
                compare_runs = gr.Dropdown(ws.runs(), multiselect=True, label="runs")
                compare_btn = gr.Button("Compare")
                compare_md = gr.Markdown()

            # -- Chat -----------------------------------------------------------------------
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    chat_adapter = gr.Dropdown(
                        ws.adapters(), label="adapter", elem_id="chat-adapter", allow_custom_value=True
                    )
                    side = gr.Checkbox(True, label="base model side by side")
                    temperature = gr.Slider(0, 2, value=CHAT_DEFAULTS["temperature"], step=0.05, label="temperature")
                    max_tokens = gr.Slider(16, 1024, value=192, step=16, label="max tokens")
                with gr.Row():
                    tuned_box = gr.Chatbot(label="tuned", elem_id="chat-tuned", height=380)
                    base_box = gr.Chatbot(label="base", elem_id="chat-base", height=380)
                with gr.Row():
                    message = gr.Textbox(label="message", scale=5, elem_id="chat-message")
                    send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    clear_btn = gr.Button("Clear", scale=1)

            # -- Export ---------------------------------------------------------------------
            with gr.Tab("Export", id="export"):
                gr.Markdown("Merge the adapter and write GGUF files for llama.cpp / Ollama (`qlora export gguf`).")
                with gr.Row():
                    export_adapter = gr.Dropdown(
                        ws.adapters(), label="adapter", elem_id="export-adapter", allow_custom_value=True
                    )
                    quants = gr.CheckboxGroup(list(QUANTS), value=["Q4_K_M"], label="quantization", elem_id="quants")
                with gr.Row():
                    export_out = gr.Textbox("", label="output folder (blank: exports/<run>)")
                    quality = gr.Checkbox(True, label="perplexity and speed table (slower)", elem_id="export-quality")
                export_btn = gr.Button("Export", variant="primary", elem_id="export-start")
                export_md = gr.Markdown(elem_id="export-report")
                export_files = gr.File(
                    label="download", file_count="multiple", interactive=False, elem_id="export-files"
                )

        # -- the job panel, under every tab -------------------------------------------------
        with gr.Group():
            with gr.Row():
                job_md = gr.Markdown(elem_id="job-status")
                stop_btn = gr.Button("Stop job", variant="stop", scale=0, elem_id="job-stop")
            job_bar = gr.HTML(elem_id="job-progress")
            job_log = gr.Textbox(label="log", lines=12, max_lines=12, autoscroll=True, elem_id="job-log")
        seen = gr.State(None)  # (job id, status) this page last rendered, to refresh results on a change
        timer = gr.Timer(1.0)

        # -- events -----------------------------------------------------------------------
        adapter_boxes = [eval_adapter, chat_adapter, export_adapter]

        def tick(seen_state, *picks):
            """Every second: the job panel and the loss plot; when the job changed state, the tabs' results
            and the lists of adapters and runs too (each tab keeps its pick while it still exists)."""
            status, bar, log = app.job_view()
            job = app.jobs.current()
            key = (job.id, job.status) if job else None
            plot = app.loss_frame()
            summary = loss_summary(plot)
            if key == seen_state:
                return (status, bar, log, plot, summary, seen_state) + (gr.skip(),) * (len(tick_outputs) - 6)
            adapters = ws.adapters()
            picks = tuple(p if p in adapters else (adapters[0] if adapters else None) for p in picks)
            try:
                report = app.eval_report(picks[0])
            except UserError as err:
                report = _error_box(err)
            exported, files = app.export_result()
            lists = [gr.Dropdown(choices=adapters, value=p) for p in picks] + [gr.Dropdown(choices=ws.runs())]
            return (status, bar, log, plot, summary, key, app.data_report(), report, exported, files, *lists)

        tick_outputs = [
            job_md,
            job_bar,
            job_log,
            loss_plot,
            loss_md,
            seen,
            data_md,
            eval_md,
            export_md,
            export_files,
        ]
        tick_outputs += [*adapter_boxes, compare_runs]
        timer.tick(tick, [seen, *adapter_boxes], tick_outputs, show_progress="hidden")
        demo.load(tick, [seen, *adapter_boxes], tick_outputs, show_progress="hidden")

        def started(job) -> str:
            return f"started: `{job.commands[0]}`"

        prepare_btn.click(
            guarded(lambda *a: started(app.prepare(*a))),
            [source, upload, in_ws, doc_mode, eval_ratio, out_dir],
            job_md,
        )
        source.change(
            lambda s: (gr.File(visible=s == UPLOAD), gr.Textbox(visible=s == IN_WORKSPACE)), source, [upload, in_ws]
        )
        preset.change(guarded(app.form_values), preset, inputs)

        def show_command(p, *v):
            return command_line(app.train_plan(p, list(v))[0])

        for box in inputs:
            box.change(lambda p, *v: _quiet(show_command, p, *v), [preset, *inputs], command, show_progress="hidden")
        demo.load(lambda p, *v: _quiet(show_command, p, *v), [preset, *inputs], command, show_progress="hidden")
        check_btn.click(guarded(lambda p, *v: app.preflight(p, list(v))), [preset, *inputs], preflight_box)

        def start(p, o, force, *v, resume=False):
            text = app.preflight(p, list(v))
            try:
                return text, started(app.start_train(p, list(v), resume, o, "" if force else text))
            except UserError as err:
                return text, _error_box(err)  # the estimate stays on screen beside the reason

        start_btn.click(guarded(lambda *a: start(*a)), [preset, overwrite, force, *inputs], [preflight_box, job_md])
        resume_btn.click(
            guarded(lambda *a: start(*a, resume=True)), [preset, overwrite, force, *inputs], [preflight_box, job_md]
        )

        def stop() -> str:
            job = app.jobs.current()
            if job is None or not job.active:
                return "No job is running."
            app.jobs.stop()
            return f"stopping {job.kind} (training saves a checkpoint first; Resume continues it)"

        stop_btn.click(stop, None, job_md)

        eval_btn.click(
            guarded(lambda *a: started(app.start_eval(*a))), [eval_adapter, eval_file, eval_prompts, speed_runs], job_md
        )
        eval_adapter.change(guarded(app.eval_report), eval_adapter, eval_md)
        compare_btn.click(guarded(app.compare), compare_runs, compare_md)

        def send(adapter, with_base, temp, tokens, text, tuned, base):
            """Stream the tuned answer, then (side by side) the base model's to the same conversation."""
            from ..infer.sampling import SamplingParams

            adapter = app.adapter(adapter)
            if not text.strip():
                raise UserError("type a message first")
            running = app.jobs.current()
            if running is not None and running.active:
                raise UserError(f"a {running.kind} job is running and needs the memory; chat when it is done")
            panes = [("tuned", [*(tuned or []), {"role": "user", "content": text}])]
            if with_base:
                panes.append(("base", [*(base or []), {"role": "user", "content": text}]))
            shown = {"tuned": panes[0][1], "base": base or []}
            for which, history in panes:
                messages = chat_messages(history)
                history.append({"role": "assistant", "content": ""})
                shown[which] = history
                params = SamplingParams(**{**CHAT_DEFAULTS, "max_new_tokens": int(tokens), "temperature": float(temp)})
                for partial in app.chat.stream(adapter, messages, params, base=which == "base"):
                    history[-1] = {"role": "assistant", "content": partial}
                    yield "", shown["tuned"], shown["base"]
            yield "", shown["tuned"], shown["base"]

        for trigger in (send_btn.click, message.submit):
            trigger(
                guarded_stream(send),
                [chat_adapter, side, temperature, max_tokens, message, tuned_box, base_box],
                [message, tuned_box, base_box],
            )
        clear_btn.click(lambda: ([], []), None, [tuned_box, base_box])

        export_btn.click(
            guarded(lambda a, q, o, k: started(app.start_export(a, q, o, k))),
            [export_adapter, quants, export_out, quality],
            job_md,
        )
    return demo, app


def chat_messages(history: list[dict]) -> list[dict]:
    """A Chatbot's history as chat messages: Gradio hands earlier turns back with their content as a list
    of parts ([{"type": "text", "text": ...}]); chat templates want the text."""
    out = []
    for message in history:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        elif isinstance(content, dict):
            content = content.get("text", "")
        out.append({"role": message["role"], "content": str(content)})
    return out


def loss_summary(frame) -> str:
    """The loss plot in words: the first and last logged point of each series (what a screen reader or a test reads)."""
    if frame.empty:
        return "No training run yet."
    parts = []
    for series, rows in frame.groupby("series", sort=False):
        points = [f"{row['loss']:.3f} at step {row['step']}" for row in (rows.iloc[0], rows.iloc[-1])]
        parts.append(f"{series} loss " + (points[1] if len(rows) == 1 else " -> ".join(points)))
    return "; ".join(parts)


def _quiet(fn, *args):
    """The command line of a form that is still being filled in: '' until its values are valid."""
    try:
        return fn(*args)
    except UserError as err:
        return f"# not valid yet: {err}"


def claim_workspace(ws: Workspace):
    """One UI per workspace (one job at a time): a lock held while this process lives."""
    handle = open(ws.state / "ui.lock", "a+")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise UserError(
            f"another qlora ui serves the workspace {ws.root} ({handle.read().strip()}); use it, or stop it first"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def launch(options: Options) -> None:
    """Start the server and block until Ctrl-C; a running job is stopped (checkpointed) on the way out."""
    ws = options.workspace
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Uploads land inside the workspace; Gradio serves its own upload cache only as downloads.
    os.environ["GRADIO_TEMP_DIR"] = str(ws.state / "tmp")
    gr = _gr()
    (ws.root / EXPORTS).mkdir(exist_ok=True)
    # Exported GGUF files are offered for download from where they are (no copy of several GB into
    # Gradio's cache); no other workspace file is served.
    gr.set_static_paths([str(ws.root / EXPORTS)])
    lock = claim_workspace(ws)
    os.chdir(ws.root)  # the CLI's relative paths (configs/, data/, runs/) mean the workspace's
    demo, app = build(options)
    auth = None
    if options.auth:
        user, password = options.auth

        def auth(u: str, p: str) -> bool:
            return hmac.compare_digest(u.encode(), user.encode()) & hmac.compare_digest(p.encode(), password.encode())

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    print(f"qlora ui: http://{options.host}:{options.port}  (workspace {ws.root})", file=sys.stderr, flush=True)

    def stop_gracefully(signum, frame):  # SIGTERM (docker stop, systemd) and SIGHUP end the UI as Ctrl-C does
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_gracefully)
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=options.host,
            server_port=options.port,
            auth=auth,
            allowed_paths=[],
            max_file_size=f"{ws.max_upload_mb}mb",
            theme=theme,
            ssr_mode=False,
            quiet=True,
            show_error=True,
            footer_links=[],
        )
    except OSError:
        raise UserError(
            f"cannot listen on {options.host}:{options.port} (the port is taken, or the address is not this "
            f"machine's); pick another --port or --host"
        ) from None
    finally:
        app.jobs.stop(timeout=120)  # a training run saves its checkpoint; Resume continues it
        lock.close()
