"""`qlora eval`: base against tuned on perplexity, keyword benchmark and speed, as a report
(tool-call accuracy too when the holdout holds tool records).

    qlora eval --adapter runs/demo/final_adapter [--prompts FILE] [--out DIR] [--eval-file FILE]

One 4-bit load serves both sides: the base model is the same weights with the
LoRA adapter switched off, so the two differ only by what training changed. The
prompt file is validated before any model is loaded. Writes `<out>/eval.json`,
`eval.md` and PNG plots (default out: `<run>/eval`).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..data.formats import iter_jsonl, load_records
from ..data.tokenize import encode_records
from ..errors import UserError
from ..infer.generation import single_turn
from ..infer.load import load_for_inference
from ..infer.sampling import SamplingParams
from ..infer.speed import measure_speed
from ..models.loader import training_numerics
from ..models.scoring import holdout_perplexity
from .keywords import DEFAULT_PROMPTS, label, load_prompt_file, score_answer
from .plots import write_plots
from .preference import preference_scores
from .report import SCHEMA_VERSION, write_report
from .retrieval import grounded_prompts, retrieval_hits
from .tools import tool_call_scores


def _answers(loaded, bench, prompts: list[list[int]], batch_size: int, side: str) -> list:
    """Each prompt's answer, `batch_size` prompts a batch, with a progress bar of decode steps."""
    from tqdm import tqdm

    gen = bench.generation
    params = SamplingParams(
        max_new_tokens=gen.max_new_tokens,
        repetition_penalty=gen.repetition_penalty,
        temperature=gen.temperature,
        seed=0,
    )
    batches = [prompts[k : k + batch_size] for k in range(0, len(prompts), batch_size)]
    results = []
    with tqdm(total=len(batches) * gen.max_new_tokens, desc=f"{side} answers", unit="step", leave=False) as bar:
        for i, batch in enumerate(batches):
            results += loaded.engine.generate(batch, params, on_step=bar.update)
            bar.update((i + 1) * gen.max_new_tokens - bar.n)  # a batch that stops early
    return results


def _training_questions(path: str | None) -> set[str] | None:
    if not path or not Path(path).is_file():
        return None
    questions = set()
    for _, obj in iter_jsonl(path):
        # SFT records hold `messages`; preference pairs hold the prompt's messages in `prompt`.
        messages = (obj.get("messages") or obj.get("prompt")) if isinstance(obj, dict) else None
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict) and message.get("role") == "user":
                questions.add(" ".join(str(message.get("content", "")).split()).lower())
    return questions


def _read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [obj for _, obj in iter_jsonl(path)] if path.is_file() else []


def _perplexity(loaded, eval_file: str, n_prompts: int, adapter: str, log) -> dict:
    """Holdout perplexity of base and tuned on the SFT records of `eval_file`."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    examples, _ = encode_records(tok, load_records(eval_file, "eval_file"), cfg.data.max_seq_len)
    if not examples:
        raise UserError(f"no holdout example of '{eval_file}' has an answer token within {cfg.data.max_seq_len} tokens")
    log(
        f"eval: {loaded.model_name} + {adapter} on {loaded.device}; {len(examples)} holdout examples, "
        f"{n_prompts} benchmark prompts"
    )
    # Scored as training scored it (the same batch size and 4-bit numerics), before any generation.
    ppl_batch = max(1, cfg.training.batch_size)
    with training_numerics(loaded.model):
        with loaded.base_only():
            base_ppl = holdout_perplexity(loaded.model, examples, ppl_batch, tok.pad_token_id, progress=True)
        tuned_ppl = holdout_perplexity(loaded.model, examples, ppl_batch, tok.pad_token_id, progress=True)
    log(f"holdout perplexity: base {base_ppl['perplexity']:.3f} -> tuned {tuned_ppl['perplexity']:.3f}")
    return {
        "base": base_ppl["perplexity"],
        "tuned": tuned_ppl["perplexity"],
        "base_loss": base_ppl["loss"],
        "tuned_loss": tuned_ppl["loss"],
        "reduction_pct": 100 * (1 - tuned_ppl["perplexity"] / base_ppl["perplexity"]),
        "tokens": tuned_ppl["tokens"],
        "examples": len(examples),
        "eval_file": str(eval_file),
        "max_seq_len": cfg.data.max_seq_len,
        "method": "exp(mean NLL over assistant-answer tokens), token-weighted",
    }


def _keyword_benchmark(
    loaded, bench, prompt_ids: list[list[int]], batch_size: int, log, title: str = "keyword benchmark"
) -> tuple[list, int, int]:
    """(rows, base passed, tuned passed): each benchmark prompt answered by both sides and scored."""
    with loaded.base_only():
        base_answers = _answers(loaded, bench, prompt_ids, batch_size, "base")
    tuned_answers = _answers(loaded, bench, prompt_ids, batch_size, "tuned")
    rows = []
    for p, b, t in zip(bench.prompts, base_answers, tuned_answers):
        rows.append(
            {
                "id": p.id,
                "prompt": p.prompt,
                "keywords": [label(k) for k in p.keywords],
                "needed": p.needed,
                "base": {"answer": b.text, "tokens": b.completion_tokens, **score_answer(b.text, p)},
                "tuned": {"answer": t.text, "tokens": t.completion_tokens, **score_answer(t.text, p)},
            }
        )
    base_passed = sum(r["base"]["passed"] for r in rows)
    tuned_passed = sum(r["tuned"]["passed"] for r in rows)
    log(f"{title}: base {base_passed}/{len(rows)} -> tuned {tuned_passed}/{len(rows)} passed")
    return rows, base_passed, tuned_passed


def _retrieval(loaded, bench, grounding, eval_file: str, rows: list, batch_size: int, log) -> dict:
    """hit@k of the index on the holdout, and the keyword benchmark with retrieved passages (the
    2 x 2 table's second column) when the benchmark ran without them."""
    out: dict = {
        "index": grounding.retriever.describe(),
        "k": grounding.settings.k,
        "mode": grounding.settings.mode,
        "budget": grounding.settings.prompt_tokens,
        "hits": retrieval_hits(grounding, eval_file, log),
        "keyword_pass_rate": None,
    }
    if not rows:
        return out
    grounded = grounded_prompts(
        grounding, loaded.engine, [p.prompt for p in bench.prompts], bench.system, bench.generation.max_new_tokens
    )
    rag_rows, base_rag, tuned_rag = _keyword_benchmark(
        loaded, bench, [ids for ids, _ in grounded], batch_size, log, "keyword benchmark with retrieval"
    )
    for row, (_, used) in zip(rag_rows, grounded):
        row["sources"] = [p.label() for p in used]
    n = len(rows)
    out.update(
        keyword_pass_rate={
            "base": {"without": sum(r["base"]["passed"] for r in rows) / n, "with": base_rag / n},
            "tuned": {"without": sum(r["tuned"]["passed"] for r in rows) / n, "with": tuned_rag / n},
        },
        prompts=n,
        passages_per_prompt=sum(len(used) for _, used in grounded) / n,
        answers=rag_rows,
    )
    return out


def run_eval(
    adapter: str,
    prompts: str | None = None,
    out: str | None = None,
    eval_file: str | None = None,
    device: str = "auto",
    speed_runs: int = 3,
    speed_tokens: int = 64,
    samples: int = 6,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    grounding=None,
    log=print,
) -> dict:
    """`grounding` (rag.prompt.Grounding, from --rag) adds retrieval: hit@k on the holdout questions
    whose source is known, and the keyword benchmark run again with retrieved passages."""
    start = time.time()
    bench_path = prompts or DEFAULT_PROMPTS
    bench = load_prompt_file(bench_path)
    loaded = load_for_inference(
        adapter=adapter, device=device, trust_remote_code=trust_remote_code, log=log, warm_up=False
    )
    cfg = loaded.cfg
    run_dir = Path(adapter).parent
    out_dir = Path(out) if out else run_dir / "eval"
    eval_file = eval_file or cfg.data.eval_file
    if not eval_file or not Path(eval_file).is_file():
        raise UserError(
            f"holdout file '{eval_file}' not found; pass --eval-file FILE (the eval.jsonl that 'qlora prepare' wrote)"
        )
    if cfg.training.method == "dpo":
        log(f"eval: {loaded.model_name} + {adapter} on {loaded.device}; a DPO run: preference pairs of {eval_file}")
        scored = {"preference": preference_scores(loaded, eval_file)}
        log(
            f"holdout perplexity: skipped (it needs SFT records; this DPO run's eval_file holds preference pairs); "
            f"preference accuracy: base {scored['preference']['accuracy']['base']:.3f} -> "
            f"tuned {scored['preference']['accuracy']['tuned']:.3f}"
        )
    elif cfg.training.method in ("ppo", "grpo"):
        from .rl import rl_scores

        log(f"eval: {loaded.model_name} + {adapter} on {loaded.device}; an RL run: sampled answers to {eval_file}")
        scored = {"rl": rl_scores(loaded, eval_file, trust_remote_code=trust_remote_code, log=log)}
        reward = scored["rl"]["reward"]
        log(
            f"holdout perplexity: skipped (an RL run learns from sampled answers); mean reward: base {reward['base']} "
            f"-> tuned {reward['tuned']}, KL to the base {scored['rl']['kl']:.4f} per answer token"
        )
    elif cfg.training.method in ("reward", "orpo", "kto"):
        from .reward import alignment_scores

        scored = alignment_scores(loaded, eval_file, adapter, log)
    else:
        scored = {"perplexity": _perplexity(loaded, eval_file, len(bench.prompts), adapter, log)}
    loaded.engine.warm_up()
    if cfg.training.method == "sft":
        tool_calls = tool_call_scores(loaded, eval_file, batch_size, log)
        if tool_calls is not None:
            scored["tool_calls"] = tool_calls

    prompt_ids = [loaded.engine.encode_chat(single_turn(p.prompt, bench.system)) for p in bench.prompts]
    # The benchmark's prompts come without tools: a tool-use run is measured by its calls, unless --prompts asks.
    skip_keywords = "tool_calls" in scored and prompts is None
    if skip_keywords:
        rows, base_passed, tuned_passed = [], 0, 0
        log("keyword benchmark: not run (a tool-use holdout; --prompts FILE runs it)")
    else:
        rows, base_passed, tuned_passed = _keyword_benchmark(loaded, bench, prompt_ids, batch_size, log)
    n = len(rows)
    if grounding is not None:
        scored["retrieval"] = _retrieval(loaded, bench, grounding, eval_file, rows, batch_size, log)
    speed = measure_speed(loaded.engine, prompt_ids[0], new_tokens=speed_tokens, runs=speed_runs)
    log(f"speed: prefill {speed['prefill_tokens_per_s']} tokens/s, decode {speed['decode_tokens_per_s']} tokens/s")

    train_questions = _training_questions(cfg.data.train_file)
    in_train = (
        None
        if train_questions is None
        else sum(" ".join(p.prompt.split()).lower() in train_questions for p in bench.prompts)
    )
    summary_path = run_dir / "train_summary.json"
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "qlora eval " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["eval"]
        else f"qlora eval --adapter {adapter}",
        "model": loaded.model_name,
        "adapter": str(adapter),
        "run_dir": str(run_dir),
        "device": speed["device"],
        "weights": "4-bit NF4" if cfg.quantization.load_in_4bit else "16-bit",
        **scored,
        "keyword_pass_rate": None if skip_keywords else {"base": base_passed / n, "tuned": tuned_passed / n},
        "keyword_benchmark": {
            "skipped": "a tool-use holdout; --prompts FILE runs it" if skip_keywords else None,
            "file": str(bench_path),
            "name": bench.name,
            "prompts": n,
            "base_passed": base_passed,
            "tuned_passed": tuned_passed,
            "in_training_data": in_train,
            "generation": bench.generation.model_dump(),
        },
        "tokens_per_s": speed["decode_tokens_per_s"],
        "speed": speed,
        "prompts": rows,
        "samples_shown": max(5, min(samples, n)) if n >= 5 else n,
        "train": json.loads(summary_path.read_text()) if summary_path.is_file() else None,
        "plots": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # The plots draw the perplexity; a DPO run's report has the preference metrics instead.
    report["plots"] = write_plots(out_dir, _read_history(run_dir), report) if "perplexity" in report else []
    report["eval_seconds"] = round(time.time() - start, 1)
    write_report(out_dir, report)
    log(f"report: {out_dir / 'eval.md'} (and {', '.join(['eval.json', *report['plots']])})")
    return report
