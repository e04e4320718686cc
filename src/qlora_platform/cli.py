"""`qlora <verb>`: thin dispatch to the package's stages.

    qlora doctor                       environment check
    qlora prepare --sample             raw data -> data/train.jsonl + data/eval.jsonl
    qlora validate data/train.jsonl    find problems before training
    qlora train --config FILE [--resume] [--dry-run] [--section.key VALUE ...]
    qlora demo                         the whole pipeline on the bundled model

Every `UserError` becomes one `error: ...` line and a non-zero exit; Ctrl-C
ends cleanly (training saves a resumable checkpoint first).
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError

DEFAULT_CONFIG = "configs/smollm2-135m.yaml"


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """['--training.learning_rate', '1e-4', '--packing=true'] -> {...}; anything else is an error."""
    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument '{arg}'; config overrides are written --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value = extra[i + 1]
            i += 2
        else:
            raise UserError(f"override '{arg}' has no value; write {arg} VALUE")
        out[key] = value
    return out


def _load_cfg(args, extra):
    from .config import load_config

    path = args.config if args.config else (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    return load_config(path, parse_overrides(extra))


def cmd_prepare(args, extra) -> int:
    from .data.prepare import format_report, prepare
    from .data.sources import parse_mapping

    if extra:
        raise UserError(f"unexpected argument(s) for prepare: {' '.join(extra)}")
    report = prepare(args.input or [], out_dir=args.out_dir, fmt=args.format, mapping=parse_mapping(args.columns),
                     doc_mode=args.doc_mode, eval_ratio=args.eval_ratio, seed=args.seed,
                     skip_invalid=args.skip_invalid, sample=args.sample, split=args.split)
    print(format_report(report))
    return 0


def cmd_validate(args, extra) -> int:
    from .data.validate import validate_file

    cfg = _load_cfg(args, extra)
    tokenizer = None
    if not args.no_tokenizer:
        from .models.loader import load_tokenizer
        tokenizer = load_tokenizer(cfg.model)
    report = validate_file(args.file, tokenizer, cfg.data.max_seq_len, args.eval)
    print(report.format())
    return 0 if report.ok else 1


def cmd_train(args, extra) -> int:
    from .config import describe_keys

    if args.help_config:
        print(describe_keys())
        return 0
    cfg = _load_cfg(args, extra)
    if args.dry_run:
        from .train.dry_run import dry_run
        print(dry_run(cfg))
        return 0
    from .train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.train()
    print(f"done: {summary['steps']} steps in {summary['train_seconds']} s, "
          f"{summary['tokens_per_s']} tokens/s, eval perplexity {summary['eval_perplexity']}")
    return 0


def cmd_doctor(args, extra) -> int:
    from .doctor import run_doctor

    return run_doctor(_load_cfg(args, extra) if (args.config or extra) else None)


def cmd_demo(args, extra) -> int:
    from .demo import run_demo

    return run_demo(_load_cfg(args, extra), data_dir=args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora", description="QLoRA fine-tuning from raw data to a served model.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("doctor", help="check Python, torch, CUDA, bitsandbytes, llama.cpp, disk, HF token")
    s.add_argument("--config", help="also check what this config needs")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("prepare", help="raw data -> chat JSONL train/holdout files")
    s.add_argument("--input", action="append", help="JSONL/JSON/CSV/PDF/HTML/TXT/MD file or HF dataset (repeatable)")
    s.add_argument("--sample", action="store_true", help="build the offline Python-stdlib assistant data set")
    s.add_argument("--format", default="auto", help="auto, hf, messages, sharegpt, alpaca, prompt_completion, text")
    s.add_argument("--columns", help="field=column mapping for CSV/HF, e.g. instruction=question,output=answer")
    s.add_argument("--doc-mode", default="qa", help="documents: qa (instruction pairs) or text (pre-training)")
    s.add_argument("--split", default="train", help="split of a Hugging Face dataset")
    s.add_argument("--out-dir", default="data")
    s.add_argument("--eval-ratio", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--skip-invalid", action="store_true", help="drop (and count) bad records instead of stopping")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("validate", help="check a chat JSONL file before training")
    s.add_argument("file")
    s.add_argument("--eval", help="holdout file to check for train/holdout leakage")
    s.add_argument("--config", help="model and max_seq_len to check against (default: the SmolLM2 preset)")
    s.add_argument("--no-tokenizer", action="store_true", help="skip token-level checks (no model needed)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("train", help="QLoRA training; config overrides as --section.key VALUE")
    s.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG})")
    s.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    s.add_argument("--dry-run", action="store_true", help="validate and print the memory estimate only")
    s.add_argument("--help-config", action="store_true", help="list every config key with its default")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="prepare -> train -> evaluate on the bundled SmolLM2, on the CPU")
    s.add_argument("--config", help="YAML config (default: configs/demo.yaml)")
    s.add_argument("--data-dir", default="data")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb == "demo" and not args.config and os.path.exists("configs/demo.yaml"):
        args.config = "configs/demo.yaml"
    try:
        return args.func(args, extra)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
