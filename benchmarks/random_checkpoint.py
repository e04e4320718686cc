"""Random-weight checkpoints in real model shapes, for GPU throughput and memory runs.

Throughput and memory of QLoRA do not depend on the weights' values, so a
random Mistral-7B-shaped checkpoint stands in for the real one where no hub is
reachable. The tokenizer is a 32k-word one with a Mistral-style chat template.

    python benchmarks/random_checkpoint.py mistral-7b /tmp/m7b [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

SHAPES = {
    "mistral-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    # Mistral's layout at 1/4 the width and 4 layers: GPU tests in seconds (the loss-parity test).
    "mistral-mini": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def make(shape: str, out: Path, tokenizer_dir: Path | None, vocab_size: int | None = None) -> dict:
    """The checkpoint in `out`; with `tokenizer_dir`, its files beside it (a tokenizer that brings
    its own chat template keeps it, others get the Mistral one); `vocab_size` overrides the shape's."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    start = time.time()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = MistralForCausalLM(
            MistralConfig(**{**SHAPES[shape], **({"vocab_size": vocab_size} if vocab_size else {})})
        )
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="20GB")
    if tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, out / f.name)
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        if not (out / "chat_template.jinja").is_file() and not cfg.get("chat_template"):
            cfg["chat_template"] = MISTRAL_TEMPLATE
        cfg["model_max_length"] = 32768
        cfg_path.write_text(json.dumps(cfg, indent=2))
    params = sum(p.numel() for p in model.parameters())
    del model
    return {
        "shape": shape,
        "path": str(out),
        "params_b": round(params / 1e9, 3),
        "make_s": round(time.time() - start, 1),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--vocab-size", type=int)
    args = ap.parse_args()
    print(json.dumps(make(args.shape, args.out, args.tokenizer, args.vocab_size)))
