"""The Hugging Face model card (README.md) written beside every final adapter.

YAML front matter (base_model, library_name: peft, tags, datasets, license)
makes the adapter render and index properly on the hub; the body records the
training config and the final metrics so the folder explains itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..config import Config, dump_config
from ..models.bundled import BUNDLED_PREFIX

# The base models' licences, where we know them; anything else says "other".
KNOWN_LICENSES = {"smollm2": "apache-2.0", "mistral": "apache-2.0", "phi-3": "mit", "llama-3": "llama3"}
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_id(name: str) -> str:
    if name.startswith(BUNDLED_PREFIX):
        return HUB_IDS.get(name[len(BUNDLED_PREFIX) :], name)
    return name


def write_model_card(folder: Path, cfg: Config, metrics: dict) -> Path:
    base = base_model_id(cfg.model.name)
    license_ = next((v for k, v in KNOWN_LICENSES.items() if k in base.lower()), "other")
    front = {
        "base_model": base,
        "library_name": "peft",
        "license": license_,
        "tags": ["fine-tuned", "qlora", "lora", "peft", "qlora-platform"],
        "datasets": [Path(cfg.data.train_file).name],
        "pipeline_tag": "text-generation",
    }
    body = [
        f"# {Path(cfg.output.dir).name}: a QLoRA adapter for {base}",
        "",
        f"Trained with qlora-platform: {cfg.quantization.quant_type.upper()} 4-bit base "
        f"(double quantization {'on' if cfg.quantization.double_quant else 'off'}), LoRA r={cfg.lora.r}, "
        f"alpha={cfg.lora.alpha:g}, dropout={cfg.lora.dropout:g}, targets {cfg.lora.target_modules}.",
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        f"model = AutoPeftModelForCausalLM.from_pretrained('{folder.name}')",
        "```",
        "",
        "## Final metrics",
        "",
        "```json",
        json.dumps(metrics, indent=2),
        "```",
        "",
        "## Training config",
        "",
        "```yaml",
        dump_config(cfg).rstrip(),
        "```",
        "",
    ]
    path = Path(folder) / "README.md"
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: never a half card
    tmp.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body))
    os.replace(tmp, path)
    return path
