#!/usr/bin/env python3
"""Shim: `python scripts/prepare_data.py ARGS` is `qlora prepare ARGS`."""

import sys

from qlora_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
