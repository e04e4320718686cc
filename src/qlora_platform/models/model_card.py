"""The Hugging Face model card (README.md) of an adapter: written beside every final adapter, and
published with it by `qlora push`.

YAML front matter (base_model, library_name: peft, tags, license, and a `model-index` with the
evaluation's numbers when there are some) makes the adapter render and index properly on the hub;
the body says how it was trained, how it scored and how to load it, so the folder or the hub page
explains itself.

    write_model_card(final_adapter, cfg, summary)                  # the trainer, at the end of a run
    text = render_model_card(cfg, summary=..., eval_report=..., repo_id="user/name", domain="...")
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from ..config import PATH_KEYS, Config
from .bundled import BUNDLED_PREFIX

# The base models' licences, where we know them; for any other base the card names none.
KNOWN_LICENSES = {"smollm2": "apache-2.0", "mistral": "apache-2.0", "phi-3": "mit", "llama-3": "llama3"}
# The hub repository each bundled model's GGUF file was made from (keys: models.bundled.BUNDLED).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
TAGS = ["fine-tuned", "qlora", "lora", "peft", "qlora-platform"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def base_model_id(name: str) -> str:
    """The hub id of a `bundled:NAME` model; any other model name as it is."""
    if name.startswith(BUNDLED_PREFIX):
        return HUB_IDS.get(name[len(BUNDLED_PREFIX) :], name)
    return name


def hub_base_model(name: str) -> str | None:
    """The base model's hub id, or None when it is a local folder or file (a card on the hub can
    only name a model of the hub)."""
    base = base_model_id(name)
    if base.startswith(BUNDLED_PREFIX) or base.endswith(".gguf") or not _HUB_ID.match(base):
        return None
    if Path(base).expanduser().exists():
        return None
    return base


def license_of(base: str) -> str | None:
    return next((v for k, v in KNOWN_LICENSES.items() if k in base.lower()), None)


def domain_tag(domain: str) -> str:
    """'Python stdlib' -> 'python-stdlib': the domain as a hub tag."""
    return re.sub(r"[^a-z0-9.+]+", "-", domain.lower()).strip("-")


def public_config(cfg: Config) -> dict:
    """The run's config with its files and folders reduced to their names: a card shows what the
    run used, never the paths of the machine it ran on."""
    data = cfg.model_dump()
    for section, key in PATH_KEYS:
        if data[section][key]:
            data[section][key] = Path(data[section][key]).name
    if hub_base_model(cfg.model.name) is None and not cfg.model.name.startswith(BUNDLED_PREFIX):
        data["model"]["name"] = Path(cfg.model.name).name
    return data


def _metric_pairs(report: dict) -> list[tuple[str, str, dict, str]]:
    """(name, metric type, {base, tuned}, format) of every headline number of an eval.json."""
    pairs = []
    if report.get("perplexity"):
        pairs.append(("holdout perplexity", "perplexity", report["perplexity"], "{:.3f}"))
    if report.get("keyword_pass_rate"):
        pairs.append(("keyword pass rate", "keyword_pass_rate", report["keyword_pass_rate"], "{:.1%}"))
    accuracy = (report.get("preference") or {}).get("accuracy")
    if accuracy:
        pairs.append(("preference accuracy", "accuracy", accuracy, "{:.1%}"))
    exact = (report.get("tool_calls") or {}).get("exact_match")
    if exact:
        pairs.append(("tool-call exact match", "exact_match", exact, "{:.1%}"))
    return [p for p in pairs if p[2].get("base") is not None and p[2].get("tuned") is not None]


def model_index(name: str, report: dict) -> list[dict]:
    """The hub's `model-index` for an eval.json: the tuned adapter's numbers, and the base model's
    beside them under their own names."""
    metrics = []
    for label, kind, values, _ in _metric_pairs(report):
        metrics.append({"name": label, "type": kind, "value": values["tuned"]})
        metrics.append({"name": f"{label} (base model)", "type": kind, "value": values["base"]})
    if not metrics:
        return []
    holdout = Path(str((report.get("perplexity") or {}).get("eval_file") or "eval.jsonl")).name
    return [
        {
            "name": name,
            "results": [
                {
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": f"holdout ({holdout})", "type": "custom"},
                    "metrics": metrics,
                }
            ],
        }
    ]


def _eval_lines(report: dict) -> list[str]:
    pairs = _metric_pairs(report)
    if not pairs:
        return []
    lines = ["## Evaluation", "", "| metric | base | tuned |", "|---|---|---|"]
    for label, _, values, fmt in pairs:
        tuned = fmt.format(values["tuned"])
        if label == "holdout perplexity" and values.get("reduction_pct") is not None:
            pct = values["reduction_pct"]
            tuned += f" ({pct:.1f}% lower)" if pct >= 0 else f" ({-pct:.1f}% higher)"
        lines.append(f"| {label} | {fmt.format(values['base'])} | {tuned} |")
    ppl = report.get("perplexity") or {}
    lines.append("")
    if ppl.get("examples"):
        lines += [
            f"Holdout perplexity is exp of the mean negative log-likelihood over the answer tokens of "
            f"{ppl['examples']} held-out examples ({ppl.get('tokens')} tokens); base is the same 4-bit "
            f"weights with the adapter switched off.",
            "",
        ]
    bench = report.get("keyword_benchmark") or {}
    if report.get("keyword_pass_rate") and bench.get("prompts"):
        lines += [
            f"The keyword pass rate is the share of the {bench['prompts']} prompts of the `{bench.get('name')}` "
            f"benchmark whose greedy answer names its expected keywords.",
            "",
        ]
    if report.get("created"):
        lines += [f"Measured by `qlora eval` on {report.get('device')}, {report['created']}.", ""]
    return lines


def _training_lines(cfg: Config, summary: dict | None, steps: int | None) -> list[str]:
    t, lora = cfg.training, cfg.lora
    done = steps if steps is not None else (summary or {}).get("steps")
    if done is None:
        done = t.max_steps if t.max_steps is not None else f"{t.epochs:g} epoch(s)"
    records = (summary or {}).get("train_records")
    quant = (
        f"4-bit {cfg.quantization.quant_type.upper()} (double quantization "
        f"{'on' if cfg.quantization.double_quant else 'off'})"
        if cfg.quantization.load_in_4bit
        else "16-bit (plain LoRA)"
    )
    rows = [
        ("method", t.method),
        ("base weights", quant),
        ("LoRA", f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets {lora.target_modules}"),
        ("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler}, warm-up {t.warmup_ratio:.0%} of the steps)"),
        ("steps", f"{done} (batch {t.batch_size} x grad accum {t.grad_accum})"),
        ("max_seq_len", f"{cfg.data.max_seq_len}{' (packed)' if cfg.data.packing else ''}"),
        ("training data", f"`{Path(cfg.data.train_file).name}`" + (f" ({records} records)" if records else "")),
    ]
    return [
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]


def _use_lines(ref: str, base: str | None, published: bool, gguf_files: list[str], tokenizer: bool) -> list[str]:
    folder = ref.rsplit("/", 1)[-1]
    tokenizer_ref = ref if tokenizer or base is None else base
    lines = ["## Use", "", "With PEFT (loads the base model and applies the adapter):", "", "```python"]
    lines += [
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{ref}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_ref}")',
        "```",
        "",
    ]
    if base is None:
        lines += ["The base model was a local folder: load it yourself and apply the adapter with `PeftModel`.", ""]
    lines += ["With qlora-platform:", "", "```bash"]
    if published:
        lines.append(f"hf download {ref} --local-dir {folder}")
    lines += [f"qlora chat --adapter {folder if published else ref}", "```", ""]
    if gguf_files:
        first = next((f for f in gguf_files if "Q4" in f), gguf_files[0])
        lines += [
            "GGUF files (the adapter merged into the base, quantized) for llama.cpp and Ollama are in `gguf/`:",
            "",
            "```bash",
            f'hf download {ref} --include "gguf/*" --local-dir {folder}',
            f"qlora chat --gguf {folder}/{first}",
        ]
        if "gguf/Modelfile" in gguf_files:
            lines.append(f"cd {folder}/gguf && ollama create {folder.lower()} -f Modelfile")
        lines += ["```", ""]
    return lines


def render_model_card(
    cfg: Config,
    *,
    summary: dict | None = None,
    steps: int | None = None,
    eval_report: dict | None = None,
    domain: str | None = None,
    repo_id: str | None = None,
    folder: Path | None = None,
    gguf_files: list[str] | None = None,
    tokenizer: bool = True,
) -> str:
    """The card's text. `repo_id` makes it the card of a published adapter (loaded from the hub,
    a base model only when it is a hub id); otherwise it describes the local `folder`.
    `summary`: the run's train_summary.json; `steps`: the steps of a checkpoint (a run's final
    adapter has them in its summary). `gguf_files`: the GGUF files' (and Modelfile's) paths in the
    repository. `tokenizer`: whether the tokenizer is saved beside the adapter (else the base's is
    loaded)."""
    published = repo_id is not None
    base = hub_base_model(cfg.model.name) if published else base_model_id(cfg.model.name)
    shown_base = base or Path(cfg.model.name).name
    name = repo_id.split("/")[-1] if repo_id else Path(cfg.output.dir).name
    front: dict = {}
    if base:
        front["base_model"] = base
    front["library_name"] = "peft"
    license_ = license_of(shown_base)
    if license_:
        front["license"] = license_
    front["tags"] = TAGS + ([domain_tag(domain)] if domain and domain_tag(domain) not in TAGS else [])
    front["pipeline_tag"] = "text-generation"
    index = model_index(name, eval_report) if eval_report else []
    if index:
        front["model-index"] = index

    about = f" for {domain}" if domain else ""
    hub_id = hub_base_model(cfg.model.name)
    base_link = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{shown_base}`"
    body = [
        f"# {name}",
        "",
        f"A LoRA adapter{about} on {base_link}, trained with QLoRA by qlora-platform.",
        "",
        *_training_lines(cfg, summary, steps),
        *(_eval_lines(eval_report) if eval_report else []),
        *_use_lines(repo_id or str(folder or "final_adapter"), base, published, gguf_files or [], tokenizer),
    ]
    if summary:
        body += ["## Final training metrics", "", "```json", json.dumps(summary, indent=2), "```", ""]
    body += [
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(public_config(cfg), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)


def write_model_card(folder: Path, cfg: Config, metrics: dict) -> Path:
    """README.md in `folder`, written whole and then renamed: never a half card."""
    path = Path(folder) / "README.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_model_card(cfg, summary=metrics, folder=Path(folder)), encoding="utf-8")
    os.replace(tmp, path)
    return path
