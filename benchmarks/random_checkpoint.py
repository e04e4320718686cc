"""A random-weight checkpoint in a real model's shape, for GPU throughput and memory runs.

    python benchmarks/random_checkpoint.py mistral-7b|phi3-mini /tmp/m7b [--tokenizer DIR] [--vocab-size N]

QLoRA's speed and memory do not depend on the weights' values, so a random Mistral-7B-shaped
checkpoint stands in for the real one where no hub is reachable. The shapes and the builder
are `qlora_platform.train.synthetic` (SHAPES, PHI3_SHAPES, make_checkpoint); `--tokenizer` copies a
tokenizer folder beside the weights (`assets/tok32k`, the 32k-word one, or
`assets/smollm2-tokenizer`, a real BPE one); a tokenizer without a chat template gets a
Mistral-style one. Prints one JSON line: shape, path, billions of parameters, seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qlora_platform.train.synthetic import PHI3_SHAPES, SHAPES, make_checkpoint  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted({**SHAPES, **PHI3_SHAPES}))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--vocab-size", type=int)
    args = ap.parse_args()
    print(json.dumps(make_checkpoint(args.shape, args.out, args.tokenizer, args.vocab_size)))
