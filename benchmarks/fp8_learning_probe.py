"""Does fp8 slow learning? Loss curves of bf16 vs fp8 (forward only, and with the input
gradient) on a repeated random batch, one JSON line per variant.

    python benchmarks/fp8_learning_probe.py --device cpu --hidden 2048 --layers 2 --seq 256 --steps 12
    python benchmarks/fp8_learning_probe.py --device cuda --hidden 4096 --layers 4 --seq 4096 --batch 4

A random-weight Mistral-layout model (built once in /tmp), NF4, the platform's fast path
(`train.model.build_training_model`), LoRA r=16 on seven projections, lr 2e-4, the same
batch every step (the throughput benchmark's setting, where the 7B on an H100 learned
slower with fp8: loss 9.26 against 8.75 after 11 steps, benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = {
    "bf16": {},
    "fp8-forward": {"training.fp8": "true"},
    "fp8-all": {"training.fp8": "true", "training.fp8_input_grad": "true"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from qlora_platform.config import load_config
    from qlora_platform.train.model import build_training_model, summed_nll
    from qlora_platform.train.trainer import build_optimizer

    path = Path(f"/tmp/fp8-probe-{args.hidden}x{args.layers}")
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        MistralForCausalLM(
            MistralConfig(
                vocab_size=32000,
                hidden_size=args.hidden,
                intermediate_size=args.hidden * 7 // 2,
                num_hidden_layers=args.layers,
                num_attention_heads=args.hidden // 128,
                num_key_value_heads=max(1, args.hidden // 512),
                max_position_embeddings=max(4096, args.seq),
                tie_word_embeddings=False,
            )
        ).save_pretrained(path)
    x = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    targets = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
    for name, over in VARIANTS.items():
        cfg = load_config(
            None,
            {
                "model.name": str(path),
                "training.device": args.device,
                "training.fast_kernels": "true",
                "quantization.compute_dtype": "bfloat16",
                "quantization.fp32_norms": "false",
                "lora.dropout": 0.0,
                "lora.target_modules": targets,
                "training.learning_rate": 2e-4,
                "training.fp8_min_tokens": 16,
                "training.gradient_checkpointing": str(args.device == "cuda").lower(),
                **over,
            },
        )
        torch.manual_seed(0)
        model, fused = build_training_model(cfg, args.device, log=lambda *_: None)
        opt = build_optimizer([q for q in model.parameters() if q.requires_grad], cfg, args.device)
        losses, start = [], time.time()
        for _ in range(args.steps):
            loss = summed_nll(model, fused, x, input_ids=x) / (x.numel() - x.size(0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
        print(
            json.dumps(
                {
                    "variant": name,
                    "hidden": args.hidden,
                    "layers": args.layers,
                    "batch": args.batch,
                    "seq": args.seq,
                    "losses": losses,
                    "seconds": round(time.time() - start, 1),
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                }
            ),
            flush=True,
        )
        del model, opt
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
