"""`qlora <verb>`: thin dispatch to the package's stages.

    qlora doctor                       environment check
    qlora prepare --sample             raw data -> data/train.jsonl + data/eval.jsonl
    qlora validate data/train.jsonl    find problems before training
    qlora train --config FILE [--resume | --overwrite] [--dry-run] [--section.key VALUE ...]
    qlora eval --adapter DIR           base vs tuned: perplexity, keyword benchmark, speed
    qlora compare RUN_DIR...           one table across runs
    qlora chat --adapter DIR           streaming multi-turn chat
    qlora generate --adapter DIR --prompt TEXT
    qlora serve --adapter DIR --port 8000 [--api-key KEY]   OpenAI-compatible API
    qlora setup llama-cpp              obtain and build the pinned llama.cpp once
    qlora merge --adapter DIR --out DIR
    qlora export gguf --adapter DIR --quant Q4_K_M [--quant Q8_0] --out DIR
    qlora push --adapter DIR --repo USER/NAME [--private] [--dry-run] [--gguf DIR]   publish to the Hub
    qlora demo                         the whole pipeline on the bundled model
    qlora ui [--workspace DIR]         the same in a browser (Gradio)

Every `UserError` becomes one `error: ...` line and a non-zero exit; Ctrl-C
ends cleanly (training saves a resumable checkpoint first).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    from .config import absolute_paths, load_config

    path = args.config if args.config else (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    return absolute_paths(load_config(path, parse_overrides(extra)))


def cmd_prepare(args, extra) -> int:
    from .data.prepare import format_report, prepare
    from .data.sources import parse_mapping

    if extra:
        raise UserError(f"unexpected argument(s) for prepare: {' '.join(extra)}")
    report = prepare(
        args.input or [],
        out_dir=args.out_dir,
        fmt=args.format,
        mapping=parse_mapping(args.columns),
        doc_mode=args.doc_mode,
        eval_ratio=args.eval_ratio,
        seed=args.seed,
        skip_invalid=args.skip_invalid,
        sample=args.sample,
        split=args.split,
        sample_preferences=args.sample_preferences,
        sample_tools=args.sample_tools,
    )
    print(format_report(report))
    return 0


def cmd_validate(args, extra) -> int:
    from .data.validate import check_jsonl_input, validate_file

    check_jsonl_input(args.file)  # a CSV or a folder is told what to run, before the tokenizer loads
    if args.eval:
        check_jsonl_input(args.eval, "--eval")
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

        print(dry_run(cfg, max(1, args.num_processes)))
        return 0
    if args.num_processes < 1:
        raise UserError("--num-processes must be at least 1")
    if args.write_accelerate_config:
        from .models.loader import pick_device
        from .train.distributed import accelerate_config

        Path(args.write_accelerate_config).write_text(
            accelerate_config(cfg, args.num_processes, pick_device(cfg.training.device))
        )
        print(
            f"wrote {args.write_accelerate_config}: accelerate launch --config_file "
            f"{args.write_accelerate_config} -m qlora_platform.cli train {' '.join(_train_argv(args, extra))}"
        )
        return 0
    if args.num_processes > 1:
        from .models.loader import pick_device
        from .train.distributed import launch

        if pick_device(cfg.training.device) == "cuda":
            import torch

            if args.num_processes > torch.cuda.device_count():
                raise UserError(
                    f"--num-processes {args.num_processes} needs as many GPUs; this machine has "
                    f"{torch.cuda.device_count()} (use --num-processes "
                    f"{torch.cuda.device_count()}, or --training.device cpu)"
                )
        from .train.trainer import claim_output_dir

        claim_output_dir(Path(cfg.output.dir), args.resume, args.overwrite, clear=False)  # before N processes start
        return launch(_train_argv(args, extra), args.num_processes)
    from contextlib import redirect_stderr, redirect_stdout

    from .train.methods import make_trainer
    from .train.trainer import GuardedStream, flush_quietly, plural, say

    # Output goes out guarded: with stdout or stderr a pipe whose reader is gone (| tee stopped by
    # the same Ctrl-C), the checkpoint is still saved and the exit code still says what happened.
    try:
        with redirect_stdout(GuardedStream(sys.stdout)), redirect_stderr(GuardedStream(sys.stderr)):
            trainer = make_trainer(cfg, resume=args.resume, overwrite=args.overwrite)
            summary = trainer.train()
        if trainer.finished or not summary:  # nothing left to train, or not the first of several processes
            return 0
        ppl, accuracy = summary["eval_perplexity"], summary.get("eval_reward_accuracy")
        holdout = "no holdout" if ppl is None else f"eval perplexity {ppl:.3f}"
        if accuracy is not None:  # a DPO run scores its holdout pairs instead
            holdout = f"holdout reward accuracy {accuracy:.3f}"
        say(
            f"done: {plural(summary['steps'], 'step')} in {summary['train_seconds']} s, "
            f"{summary['tokens_per_s']} tokens/s, {holdout}",
            sys.stdout,
        )
        return 0
    except UserError as err:
        say(f"error: {err}", sys.stderr)
        return err.exit_code
    finally:
        flush_quietly(sys.stdout)


def _train_argv(args, extra) -> list[str]:
    """The train command line each process of a multi-process run gets."""
    return (
        ([f"--config={args.config}"] if args.config else [])
        + (["--resume"] if args.resume else [])
        + (["--overwrite"] if args.overwrite else [])
        + list(extra)
    )


def cmd_eval(args, extra) -> int:
    from .eval.run import run_eval

    if extra:
        raise UserError(f"unexpected argument(s) for eval: {' '.join(extra)}")
    grounding = _grounding(args)  # a missing or empty index stops here, before the model loads
    run_eval(
        args.adapter,
        grounding=grounding,
        prompts=args.prompts,
        out=args.out,
        eval_file=args.eval_file,
        device=args.device,
        speed_runs=args.speed_runs,
        speed_tokens=args.speed_tokens,
        samples=args.samples,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
    )
    return 0


def cmd_compare(args, extra) -> int:
    from .eval.compare import compare_runs, prompts_file

    if extra:
        raise UserError(f"unexpected argument(s) for compare: {' '.join(extra)}")
    markdown, _ = compare_runs(args.runs, args.out)
    print(markdown)
    if args.out:
        base = Path(args.out).with_suffix("")
        print(f"written: {base}.md, {base}.json, {prompts_file(args.out)}")
    return 0


def _sampling(args):
    from .infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop or [],
        seed=args.seed,
    ).validate()


def _engine(args):
    if args.gguf:
        if args.adapter or args.model:
            raise UserError("--gguf runs a GGUF file on its own; leave out --adapter and --model")
        from .export.gguf import stream_completion
        from .export.llama_cpp import ensure_llama_cpp
        from .infer.gguf_engine import GgufEngine

        return GgufEngine(args.gguf, ensure_llama_cpp, stream_completion)
    from .infer.load import load_for_inference

    return load_for_inference(
        adapter=args.adapter, model=args.model, device=args.device, trust_remote_code=args.trust_remote_code
    ).engine


def _rag_settings(args):
    from pydantic import ValidationError

    from .rag.settings import RagSettings

    own = args.verb == "rag"  # `qlora rag` names its options plainly; chat, serve... prefix them with --rag-
    flags = {
        "collection": "--collection" if own else "--rag-collection",
        "k": "-k" if own else "--rag-k",
        "mode": "--mode" if own else "--rag-mode",
        "prompt_tokens": "--rag-budget",
    }
    values = {
        "collection": args.collection,
        "k": args.k,
        "mode": args.mode,
        "prompt_tokens": getattr(args, "rag_budget", None),
        "embedding_model": getattr(args, "embedding_model", None),
        "chunk_tokens": getattr(args, "chunk_tokens", None),
        "chunk_overlap": getattr(args, "chunk_overlap", None),
    }
    try:
        return RagSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        if not first["loc"]:  # a check across keys words its own message
            raise UserError(first["msg"].removeprefix("Value error, ")) from None
        key = str(first["loc"][0])
        raise UserError(f"{flags.get(key, '--' + key.replace('_', '-'))}: {first['msg']}") from None


def _grounding(args):
    """The retriever and its prompt settings for --rag LOCATION, or None without --rag."""
    if not getattr(args, "rag", None):
        return None
    from .rag.prompt import Grounding
    from .rag.retrieve import Retriever

    settings = _rag_settings(args)
    return Grounding(Retriever.open(args.rag, settings), settings)


def cmd_rag(args, extra) -> int:
    # argparse leaves the question's words that follow an option among the unknown arguments;
    # after `--` every word is the question's, so a question may start with a dash.
    rest = extra[extra.index("--") + 1 :] if "--" in extra else []
    extra = extra[: extra.index("--")] if "--" in extra else extra
    words = [e for e in extra if not e.startswith("-")] + rest if args.action == "query" else []
    unknown = [e for e in extra if e not in words]
    if unknown or (args.action == "index" and args.question):
        raise UserError(f"unexpected argument(s) for rag {args.action}: {' '.join(unknown or args.question)}")
    args.question = list(args.question) + words
    location = _rag_location(args)
    settings = _rag_settings(args)
    if args.action == "index":
        from .rag.index import format_index_report, index_documents

        print(format_index_report(index_documents(args.input or [], location, settings, device=args.device)))
        return 0
    from .rag.retrieve import Retriever

    if not args.question or not " ".join(args.question).strip():
        raise UserError('give the question: qlora rag query --db DIR "How do I ...?"')
    question = " ".join(args.question)
    retriever = Retriever.open(location, settings, device=args.device, embedding_model=args.embedding_model)
    passages = retriever.search([question], settings.k, settings.mode)[0]
    if args.json:
        import json

        print(json.dumps([p.as_dict(n) for n, p in enumerate(passages, 1)], indent=2, ensure_ascii=False))
        return 0
    if not passages:
        print(f"no passage matches (mode {settings.mode}; try --mode vector)")
    for n, p in enumerate(passages, 1):
        similarity = "" if p.similarity is None or settings.mode == "vector" else f", similarity {p.similarity:.3f}"
        text = " ".join(p.text.split())
        print(f"[{n}] {p.label()}  ({settings.mode} score {p.score:.4f}{similarity})")
        print(f"    {text[:400]}{' ...' if len(text) > 400 else ''}")
    return 0


def _rag_location(args) -> str:
    from .rag.store import is_url

    if args.db and args.chroma_url:
        raise UserError("give --db DIR or --chroma-url URL, not both")
    if args.db and is_url(args.db):
        raise UserError(f"--db takes a folder; for a Chroma server write --chroma-url {args.db}")
    if args.chroma_url and not is_url(args.chroma_url):
        raise UserError(f"--chroma-url takes http://HOST:PORT; for a folder write --db {args.chroma_url}")
    location = args.db or args.chroma_url
    if not location:
        raise UserError(
            f"give the index: --db DIR (a folder) or --chroma-url http://HOST:PORT (qlora rag {args.action})"
        )
    return location


def cmd_chat(args, extra) -> int:
    from .infer.chat import chat_repl

    if extra:
        raise UserError(f"unexpected argument(s) for chat: {' '.join(extra)}")
    from .infer.chat import line_editing, load_tools
    from .models.bundled import cache_dir

    params = _sampling(args)
    tools = None
    if args.tools:
        if args.gguf:
            raise UserError("--tools needs --adapter or --model: a --gguf engine does not render tool schemas")
        tools = load_tools(args.tools)
    grounding = _grounding(args)
    engine = _engine(args)
    line_editing(cache_dir() / "chat_history")
    label = f"the adapter {args.adapter}" if args.adapter else args.gguf or args.model
    return chat_repl(engine, params, system=args.system, label=label, tools=tools, grounding=grounding)


def cmd_generate(args, extra) -> int:
    from .infer.chat import generate_once

    if extra:
        raise UserError(f"unexpected argument(s) for generate: {' '.join(extra)}")
    params = _sampling(args)
    if args.raw and args.rag:
        raise UserError("--raw and --rag do not go together: retrieved passages go into a chat prompt")
    grounding = _grounding(args)
    return generate_once(_engine(args), args.prompt, params, system=args.system, raw=args.raw, grounding=grounding)


def cmd_serve(args, extra) -> int:
    from .infer.auth import ApiKeys
    from .infer.server import ServerSettings, serve

    if extra:
        raise UserError(f"unexpected argument(s) for serve: {' '.join(extra)}")
    if bool(args.adapter) == bool(args.model):
        raise UserError("give either --adapter DIR or --model NAME")
    for name in ("max_concurrent", "max_queue", "max_body_kb", "default_max_tokens", "max_connections"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    for name in ("body_timeout", "max_model_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    keys = ApiKeys.gather(args.api_key, args.api_key_file)
    if args.api_key:
        print(
            "warning: --api-key is visible to every user of this machine (ps, /proc); "
            "prefer $QLORA_API_KEYS or --api-key-file",
            file=sys.stderr,
        )
    settings = ServerSettings(
        adapter=args.adapter,
        model=args.model,
        device=args.device,
        served_name=args.name,
        keys=keys,
        cors_origins=args.cors_origin or [],
        max_active=args.max_concurrent,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        max_body_bytes=args.max_body_kb * 1024,
        body_timeout=args.body_timeout,
        default_max_tokens=args.default_max_tokens,
        max_model_len=args.max_model_len,
        grounding=_grounding(args),  # a missing or empty index stops here, before the server starts
    )
    return serve(
        settings,
        args.host,
        args.port,
        args.drain_timeout,
        args.log_level,
        access_log=args.access_log,
        max_connections=args.max_connections,
    )


def cmd_setup(args, extra) -> int:
    from .export.llama_cpp import ensure_llama_cpp

    if extra or args.what != "llama-cpp":
        raise UserError("usage: qlora setup llama-cpp [--force]")
    tools = ensure_llama_cpp(force=args.force)
    print(f"llama.cpp ready: source {tools.source}, tools in {tools.build / 'bin'}")
    return 0


def cmd_merge(args, extra) -> int:
    from .export.merge import merge_adapter

    if extra:
        raise UserError(f"unexpected argument(s) for merge: {' '.join(extra)}")
    merge_adapter(args.adapter, args.out, dtype=args.dtype)
    return 0


def cmd_export(args, extra) -> int:
    from .export.run import export_gguf

    if extra or args.format != "gguf":
        raise UserError("usage: qlora export gguf (--adapter DIR | --model DIR) --quant Q4_K_M --out DIR")
    export_gguf(
        adapter=args.adapter,
        model=args.model,
        quants=args.quant,
        out=args.out,
        lora_only=args.lora_only,
        eval_file=args.eval_file,
        n_ctx=args.ctx,
        dtype=args.dtype,
        quality=not args.no_quality,
    )
    return 0


def cmd_push(args, extra) -> int:
    from .export.push import push_adapter

    if extra:
        raise UserError(f"unexpected argument(s) for push: {' '.join(extra)}")
    push_adapter(
        args.adapter,
        args.repo,
        private=args.private,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        gguf=args.gguf,
        domain=args.domain,
    )
    return 0


def cmd_ui(args, extra) -> int:
    from .infer.chat import is_loopback
    from .ui.login import gather_auth
    from .ui.workspace import Workspace

    if extra:
        raise UserError(f"unexpected argument(s) for ui: {' '.join(extra)}")
    auth = gather_auth(args.auth, args.auth_file)
    if args.max_upload_mb < 1:
        raise UserError("--max-upload-mb must be at least 1")
    workspace = Workspace(Path(args.workspace), max_upload_mb=args.max_upload_mb)
    if not is_loopback(args.host) and auth is None:
        print(
            f"warning: the UI on {args.host} is open to anyone who can reach this machine: it starts jobs and "
            f"reads the workspace; give --auth USER:PASS (or $QLORA_UI_AUTH)",
            file=sys.stderr,
        )
    from .ui.app import Options, launch

    launch(Options(workspace, args.host, args.port, auth, args.device))
    return 0


def cmd_doctor(args, extra) -> int:
    from .doctor import run_doctor

    return run_doctor(_load_cfg(args, extra) if (args.config or extra) else None)


def cmd_sweep(args, extra) -> int:
    from .sweep import SweepPlan, check_points, grid_points, parse_grid, run_sweep

    overrides = parse_overrides(extra)
    if "output.dir" in overrides or "dir" in overrides:
        raise UserError("the sweep sets output.dir for each point; give the sweep folder with --out")
    config = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    points = grid_points(parse_grid(args.grid or []))
    check_points(config, overrides, points)
    eval_args = ["--speed-runs", str(args.speed_runs)]
    eval_args += ["--eval-file", args.eval_file] if args.eval_file else []
    eval_args += ["--prompts", args.prompts] if args.prompts else []
    plan = SweepPlan(config, overrides, points, Path(args.out), eval_args)
    if args.dry_run:
        for point in points:
            print(
                f"{point.label}:\n  qlora {' '.join(plan.train_argv(point))}\n  qlora {' '.join(plan.eval_argv(point))}"
            )
        print(f"{len(points)} points; nothing run (--dry-run)")
        return 0
    run_sweep(plan)
    return 0


def cmd_demo(args, extra) -> int:
    from .demo import run_demo

    return run_demo(_load_cfg(args, extra), data_dir=args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .infer.sampling import CHAT_DEFAULTS
    from .rag.settings import MODES as RAG_MODES
    from .rag.settings import describe as describe_rag

    p = argparse.ArgumentParser(
        prog="qlora", description="QLoRA fine-tuning from raw data to a served model.", allow_abbrev=False
    )
    p.add_argument("--version", action="version", version=f"qlora-platform {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def rag_args(s, prefix="--rag-"):
        s.add_argument(f"{prefix}collection", dest="collection", **describe_rag("collection"))
        s.add_argument(f"{prefix}k" if prefix != "--" else "-k", dest="k", type=int, **describe_rag("k"))
        s.add_argument(f"{prefix}mode", dest="mode", choices=list(RAG_MODES), **describe_rag("mode"))
        if prefix != "--":
            s.add_argument("--rag-budget", type=int, **describe_rag("prompt_tokens"))

    def grounding_args(s):
        s.add_argument(
            "--rag",
            metavar="INDEX",
            help="answer from the documents of this index (a folder from 'qlora rag index', or a Chroma server URL)",
        )
        rag_args(s)

    s = sub.add_parser("doctor", help="check Python, torch, CUDA, bitsandbytes, llama.cpp, disk, HF token")
    s.add_argument("--config", help="also check what this config needs")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("prepare", help="raw data -> chat JSONL train/holdout files")
    s.add_argument(
        "--input",
        action="append",
        help="JSONL/JSON/CSV/PDF/HTML/TXT/MD file, a folder of them, or HF dataset (repeatable)",
    )
    s.add_argument("--sample", action="store_true", help="build the offline Python-stdlib assistant data set")
    s.add_argument(
        "--sample-preferences",
        action="store_true",
        help="build its preference pairs: the documented answer chosen, a neighbour's answer rejected",
    )
    s.add_argument(
        "--sample-tools",
        action="store_true",
        help="build a tool-use set: docs lookup, arithmetic and unit conversion calls, and turns that need none",
    )
    s.add_argument("--format", default="auto", help="auto, hf, messages, sharegpt, alpaca, prompt_completion, text")
    s.add_argument("--columns", help="field=column mapping for CSV/HF, e.g. instruction=question,output=answer")
    s.add_argument("--doc-mode", default="qa", help="documents: qa (instruction pairs) or text (pre-training)")
    s.add_argument("--split", default="train", help="split of a Hugging Face dataset")
    s.add_argument("--out-dir", default="data")
    s.add_argument("--eval-ratio", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--skip-invalid", action="store_true", help="drop (and count) bad records instead of stopping")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("validate", help="check a prepared chat JSONL file before training (after qlora prepare)")
    s.add_argument("file")
    s.add_argument("--eval", help="holdout file to check for train/holdout leakage")
    s.add_argument("--config", help="model and max_seq_len to check against (default: the SmolLM2 preset)")
    s.add_argument("--no-tokenizer", action="store_true", help="skip token-level checks (no model needed)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("train", help="QLoRA training; config overrides as --section.key VALUE")
    s.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG})")
    s.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an output.dir that holds a run (deletes its checkpoints, log, adapter)",
    )
    s.add_argument("--dry-run", action="store_true", help="validate and print the memory estimate only")
    s.add_argument("--help-config", action="store_true", help="list every config key with its default")
    s.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="train in N processes on this machine (training.strategy: ddp, fsdp, deepspeed-zero3)",
    )
    s.add_argument(
        "--write-accelerate-config",
        metavar="FILE",
        help="write an accelerate config for --num-processes and training.strategy, then stop",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="base vs tuned: holdout perplexity, keyword benchmark, speed -> report")
    s.add_argument("--adapter", required=True, help="<run>/final_adapter or <run>/checkpoint-N")
    s.add_argument("--prompts", help="benchmark prompt file (default: the sample domain's, shipped with the package)")
    s.add_argument("--out", help="report folder (default <run>/eval)")
    s.add_argument("--eval-file", help="holdout JSONL (default: the run's data.eval_file)")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--speed-runs", type=int, default=3, help="timed generations (median reported)")
    s.add_argument("--speed-tokens", type=int, default=64, help="new tokens per timed generation")
    s.add_argument("--samples", type=int, default=6, help="answers shown side by side in eval.md (at least 5)")
    s.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="benchmark prompts generated together (the default file's 26 in one batch a side, which on a CPU "
        "takes about half the time of batches of 8; lower it when memory is short)",
    )
    s.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the base model's own Python code run (never taken from the run's config)",
    )

    grounding_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("rag", help="rag index / rag query: retrieval over your documents (ChromaDB)")
    s.add_argument("action", choices=["index", "query"], help="index: build or update; query: search")
    s.add_argument("question", nargs="*", help="query: the question")
    s.add_argument("--input", action="append", help="index: PDF/HTML/MD/TXT/RST/JSONL file or folder (repeatable)")
    s.add_argument("--db", help="the index folder (an embedded ChromaDB)")
    s.add_argument("--chroma-url", help="a Chroma server instead of a folder, e.g. http://127.0.0.1:8000")
    rag_args(s, prefix="--")
    s.add_argument(
        "--embedding-model",
        help=f"{describe_rag('embedding_model')['help']} (default: {describe_rag('embedding_model')['default']} "
        f"to index; the index's own model to query)",
    )
    s.add_argument("--chunk-tokens", type=int, **describe_rag("chunk_tokens"))
    s.add_argument("--chunk-overlap", type=int, **describe_rag("chunk_overlap"))
    s.add_argument("--device", default="cpu", help="device of the embedding model: cpu or cuda")
    s.add_argument("--json", action="store_true", help="query: the passages as JSON")
    s.set_defaults(func=cmd_rag)

    s = sub.add_parser("compare", help="one table across run folders (markdown + JSON)")
    s.add_argument("runs", nargs="+", help="run folders (output.dir of each training run)")
    s.add_argument("--out", help="also write OUT.md and OUT.json")
    s.set_defaults(func=cmd_compare)

    def source_args(s):
        s.add_argument("--adapter", help="<run>/final_adapter or <run>/checkpoint-N")
        s.add_argument("--model", help="a model without adapter: hub id, folder, .gguf or bundled:NAME")
        s.add_argument("--device", default="auto", help="auto, cpu or cuda")
        if s.prog.split()[-1] != "serve":
            s.add_argument("--gguf", help="a .gguf file, run on the CPU by llama.cpp")
            s.add_argument(
                "--trust-remote-code",
                action="store_true",
                help="let the model's own Python code run (never taken from an adapter's config)",
            )

    def sampling_args(s, max_tokens=CHAT_DEFAULTS["max_new_tokens"]):
        s.add_argument("--max-tokens", type=int, default=max_tokens)
        s.add_argument("--temperature", type=float, default=CHAT_DEFAULTS["temperature"], help="0 = greedy")
        s.add_argument("--top-p", type=float, default=CHAT_DEFAULTS["top_p"])
        s.add_argument("--top-k", type=int, default=CHAT_DEFAULTS["top_k"])
        s.add_argument("--repetition-penalty", type=float, default=CHAT_DEFAULTS["repetition_penalty"])
        s.add_argument("--stop", action="append", help="stop string (repeatable)")
        s.add_argument("--seed", type=int)
        s.add_argument("--system", help="system prompt")

    s = sub.add_parser("chat", help="streaming multi-turn chat in the terminal")
    source_args(s)
    sampling_args(s)
    grounding_args(s)
    s.add_argument(
        "--tools",
        metavar="FILE",
        help="a JSON list of tool schemas (OpenAI shape) the model may call; you type each call's result",
    )
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("generate", help="answer one prompt, streamed, with tokens/s")
    source_args(s)
    sampling_args(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--raw", action="store_true", help="plain text continuation, no chat template")
    grounding_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat, completions, /generate, metrics)")
    source_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="model id clients use (default: the adapter or model path)")
    s.add_argument(
        "--api-key",
        action="append",
        help="accepted key (repeatable; visible in ps: prefer $QLORA_API_KEYS or --api-key-file)",
    )
    s.add_argument("--api-key-file", help="file with one accepted key per line")
    s.add_argument("--cors-origin", action="append", help="allowed browser origin (repeatable; default none)")
    s.add_argument("--max-concurrent", type=int, default=1, help="generations running at once")
    s.add_argument("--max-queue", type=int, default=8, help="requests waiting beyond those; more get 429")
    s.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a request may wait (then 503)")
    s.add_argument("--max-body-kb", type=int, default=1024, help="largest request body")
    s.add_argument("--body-timeout", type=float, default=10.0, help="seconds a request body may take to arrive (408)")
    s.add_argument("--max-connections", type=int, default=128, help="open connections; more get 503 at once")
    s.add_argument("--max-model-len", type=int, help="largest prompt + max_tokens (default: the model's context)")
    s.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests")
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    grounding_args(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("setup", help="setup llama-cpp: obtain and build the pinned llama.cpp (cached)")
    s.add_argument("what", help="llama-cpp")
    s.add_argument("--force", action="store_true", help="rebuild even when a build is cached")
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("merge", help="merge a LoRA adapter into 16-bit base weights, with a logits check")
    s.add_argument("--adapter", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("export", help="export gguf: merge, convert, quantize, check, report")
    s.add_argument("format", help="gguf")
    s.add_argument("--adapter", help="LoRA adapter (merged first)")
    s.add_argument("--model", help="a Hugging Face model folder instead of an adapter")
    s.add_argument("--quant", action="append", help="Q4_K_M, Q5_K_M, Q8_0, ... (repeatable; default Q4_K_M)")
    s.add_argument("--out", required=True)
    s.add_argument("--lora-only", action="store_true", help="also convert the adapter alone (convert_lora_to_gguf)")
    s.add_argument("--eval-file", help="holdout JSONL for the perplexity table (default: the run's)")
    s.add_argument("--ctx", type=int, default=512, help="context of the perplexity chunks")
    s.add_argument("--dtype", default="bf16", help="dtype of the merged model")
    s.add_argument("--no-quality", action="store_true", help="skip the perplexity and speed table")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("sweep", help="one run per point of a grid of config values, each evaluated, then one table")
    s.add_argument("--config", help=f"base YAML config (default {DEFAULT_CONFIG}); --section.key VALUE applies to all")
    s.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="a config key and its values, e.g. lora.r=8,16,32 (repeatable: the points are every combination)",
    )
    s.add_argument("--out", default="runs/sweep", help="sweep folder: one run folder per point, sweep.md, plots")
    s.add_argument("--eval-file", help="holdout JSONL of every eval (default: each run's data.eval_file)")
    s.add_argument("--prompts", help="benchmark prompt file of every eval (default: the sample domain's)")
    s.add_argument("--speed-runs", type=int, default=3, help="timed generations of every eval")
    s.add_argument("--dry-run", action="store_true", help="check the grid and print each point's commands")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("push", help="publish an adapter to the Hugging Face Hub: files, model card, eval metrics")
    s.add_argument("--adapter", required=True, help="<run>, <run>/final_adapter or <run>/checkpoint-N")
    s.add_argument(
        "--repo", required=True, metavar="USER/NAME", help="hub repository to publish to (created if absent)"
    )
    s.add_argument("--private", action="store_true", help="create the repository private")
    s.add_argument("--dry-run", action="store_true", help="print the files and the model card; send nothing")
    s.add_argument(
        "--overwrite", action="store_true", help="push to a repository that exists (a new commit replaces its files)"
    )
    s.add_argument(
        "--gguf", metavar="DIR", help="also send DIR/*.gguf and DIR/Modelfile (qlora export gguf's --out) under gguf/"
    )
    s.add_argument(
        "--domain", metavar="TEXT", help="what the adapter is for, in the card and as a tag (e.g. 'Python stdlib')"
    )
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("ui", help="the pipeline in a browser: Data, Train, Evaluate, Chat, Export tabs (Gradio)")
    s.add_argument("--workspace", default=".", help="folder the UI reads and writes (data/, runs/, exports/)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--auth", metavar="USER:PASS", help="require this login (visible in ps: prefer $QLORA_UI_AUTH)")
    s.add_argument("--auth-file", help="file holding USER:PASS")
    s.add_argument("--max-upload-mb", type=int, default=200, help="largest file the Data tab accepts")
    s.add_argument("--device", default="auto", help="device of the Chat tab's model: auto, cpu or cuda")
    s.set_defaults(func=cmd_ui)

    s = sub.add_parser("demo", help="prepare -> train -> evaluate on the bundled SmolLM2, on the CPU")
    s.add_argument("--config", help="YAML config (default: configs/demo.yaml)")
    s.add_argument("--data-dir", default="data")
    s.set_defaults(func=cmd_demo)
    # Exact option names only: a prefix such as --r must reach the config overrides (lora.r),
    # not argparse's guess (--resume). Every --help shows the defaults.
    for parser in (p, *sub.choices.values()):
        parser.allow_abbrev = False
        parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return p


def _not_kernels_community(record) -> bool:
    return "kernels-community" not in record.getMessage()


def quiet_library_noise() -> None:
    """Drop library log lines that are no use to a user of the CLI.

    bitsandbytes on CPUs with AVX512-BF16 warns on every model load that the optional
    `kernels` package (a Hub download) is missing; its own CPU kernels run instead. The filter
    is one function, so a logger holds it once however often `main` runs in a process.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_kernels_community)


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "adapter", None):
        from .infer.load import resolve_adapter_dir

        args.adapter = str(resolve_adapter_dir(args.adapter))
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
