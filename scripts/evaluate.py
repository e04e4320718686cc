#!/usr/bin/env python3
"""Shim: `python scripts/evaluate.py ARGS` is `qlora eval ARGS`."""

import sys

from qlora_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
