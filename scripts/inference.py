#!/usr/bin/env python3
"""Shim: `python scripts/inference.py --mode chat|single|api ARGS` is `qlora chat|generate|serve ARGS`.

python scripts/inference.py --mode chat --adapter runs/demo/final_adapter
python scripts/inference.py --mode single --adapter runs/demo/final_adapter --prompt "Hi"
python scripts/inference.py --mode api --adapter runs/demo/final_adapter --port 8000
"""

import argparse
import sys

from qlora_platform.cli import main

VERBS = {"chat": "chat", "single": "generate", "api": "serve"}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--mode", choices=sorted(VERBS), default="chat")
    args, rest = parser.parse_known_args()
    sys.exit(main([VERBS[args.mode], *rest]))
