#!/usr/bin/env python3
"""Shim: `python scripts/train.py ARGS` is `qlora train ARGS`."""

import sys

from qlora_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
