"""Per-step losses of one variant over N steps on a fixed stream of batches, to compare variants.

    python benchmarks/loss_parity_probe.py reference 50
    python benchmarks/loss_parity_probe.py qlora_platform 50

Random Mistral-7B-shaped weights (`train_throughput.checkpoint`), batch 2 x 1024: 64 fixed
random "documents" cycled in order, the same for every variant. Prints one JSON line.
"""

import json
import sys

import torch
from train_throughput import build_qlora_platform, build_reference, checkpoint

if __name__ == "__main__":
    variant, steps = sys.argv[1], int(sys.argv[2])
    path = checkpoint("mistral-7b")
    torch.manual_seed(0)
    step = build_qlora_platform(path, 1024, 2) if variant == "qlora_platform" else build_reference(path)
    docs = torch.randint(0, 32000, (64, 1024), generator=torch.Generator().manual_seed(123))
    losses = []
    for i in range(steps):
        x = docs[(2 * i) % 64 : (2 * i) % 64 + 2].cuda()
        losses.append(round(float(step(x)), 4))
    print(json.dumps({"variant": variant, "losses": losses}))
