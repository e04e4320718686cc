"""What `qlora eval` reports for reward, ORPO and KTO runs, in place of the SFT holdout perplexity.

    scored = alignment_scores(loaded, "data/pref/eval.jsonl", log=print)   # loaded: infer.load.load_for_inference
    scored["reward"]["accuracy"]        # a reward run; an ORPO run: scored["preference"] (eval/preference.py)
    lines = alignment_markdown(report)  # the eval.md sections of "reward" and "kto"

- reward run: the reward model (its adapter, loaded as the tuned model, and the scalar head saved
  beside it) scores both answers of every holdout pair; `accuracy` is the share of pairs whose
  chosen answer scores higher, `margin` the mean r(chosen) - r(rejected). There is no base figure:
  the base has no head.
- orpo run, and kto run on a holdout of pairs: `preference_scores` of eval/preference.py (each
  model ranks a pair by its own log p(chosen) - log p(rejected)).
- kto run on a holdout of KTO records: each completion's log-ratio log p_tuned(y|x) - log p_base(y|x)
  (summed over its tokens); `accuracy` is the share of desirable completions whose log-ratio is
  above the mean log-ratio of the undesirable ones, `margin` the mean log-ratio of the desirable
  minus that of the undesirable completions (nats).
"""

from __future__ import annotations

import torch

from ..data.formats import iter_jsonl_lines, parse_jsonl_line
from ..data.preference import detect_kind, load_kind_records
from ..data.preference_tokenize import encode_kto, encode_pairs
from ..errors import UserError
from ..models.loader import training_numerics
from ..models.reward_model import RewardModel
from ..models.scoring import rows_logps
from ..models.value_head import load_head
from .preference import preference_scores

ALIGNMENT_METHODS = ("reward", "orpo", "kto")
REWARD_DEFINITION = (
    "reward: the reward model's score (scalar head on the last token's final hidden state); accuracy: share of "
    "holdout pairs with r(chosen) > r(rejected); margin: mean r(chosen) - r(rejected)"
)
KTO_DEFINITION = (
    "log-ratio: log p_tuned(y|x) - log p_base(y|x) summed over the completion's tokens (base = adapter off); "
    "accuracy: share of desirable completions whose log-ratio is above the mean log-ratio of the undesirable "
    "ones; margin: mean log-ratio of the desirable minus that of the undesirable completions"
)


def _holdout_kind(path: str) -> str | None:
    for lineno, line in iter_jsonl_lines(path):
        try:
            return detect_kind(parse_jsonl_line(line, f"{path}:{lineno}"))
        except UserError:
            return None  # a bad line: the loader reports it with its line number
    return None


def reward_scores(loaded, eval_file: str, batch_size: int | None = None) -> dict:
    """Accuracy and mean margin of the reward model (the loaded adapter and its head) on the holdout pairs."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    records = load_kind_records(eval_file, "eval_file", "preference")
    pairs, dropped = encode_pairs(tok, records, cfg.data.max_seq_len)
    if not pairs:
        raise UserError(f"no holdout pair of '{eval_file}' fits in data.max_seq_len {cfg.data.max_seq_len}")
    model = loaded.model
    head = load_head(loaded.adapter, model.get_base_model().config.get_text_config().hidden_size)
    device = next(model.parameters()).device
    rm = RewardModel(model, head.to(device), loaded.adapter, adapter=model.active_adapter)
    rows = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
    with training_numerics(model):  # scored as training scored it, before any generation repacks the layers
        rewards = rm.score_sequences(rows, tok.pad_token_id, batch_size or max(1, cfg.training.batch_size))
    chosen, rejected = rewards[: len(pairs)], rewards[len(pairs) :]
    margin = chosen - rejected
    return {
        "accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "pairs": len(pairs),
        "dropped": dropped,
        "eval_file": str(eval_file),
        "max_seq_len": cfg.data.max_seq_len,
        "method": REWARD_DEFINITION,
    }


def kto_scores(loaded, eval_file: str, batch_size: int | None = None) -> dict:
    """How the tuning moved desirable against undesirable completions of a KTO-record holdout (module doc)."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    rows, labels, dropped = [], [], 0
    for record in load_kind_records(eval_file, "eval_file", "kto"):
        ex = encode_kto(tok, record, cfg.data.max_seq_len)
        if ex is None:
            dropped += 1
            continue
        rows.append({"input_ids": ex["completion_input_ids"], "labels": ex["completion_labels"]})
        labels.append(ex["label"])
    if not rows:
        raise UserError(f"no holdout completion of '{eval_file}' fits in data.max_seq_len {cfg.data.max_seq_len}")
    size, pad = batch_size or max(1, cfg.training.batch_size), tok.pad_token_id
    with training_numerics(loaded.model):
        with loaded.base_only():
            base = rows_logps(loaded.model, rows, size, pad, "kto (base)")
        tuned = rows_logps(loaded.model, rows, size, pad, "kto (tuned)")
    ratio, desirable = tuned - base, torch.tensor(labels)
    good = ratio[desirable] if desirable.any() else None
    bad = ratio[~desirable] if (~desirable).any() else None
    both = good is not None and bad is not None
    return {
        "accuracy": float((good > bad.mean()).float().mean()) if both else None,
        "margin": float(good.mean() - bad.mean()) if both else None,
        "desirable_logratio": float(good.mean()) if good is not None else None,
        "undesirable_logratio": float(bad.mean()) if bad is not None else None,
        "desirable": int(desirable.sum()),
        "undesirable": int((~desirable).sum()),
        "dropped": dropped,
        "eval_file": str(eval_file),
        "max_seq_len": cfg.data.max_seq_len,
        "method": KTO_DEFINITION,
    }


def alignment_scores(loaded, eval_file: str, adapter: str, log=print) -> dict:
    """The report entries of a reward, orpo or kto run's holdout (module doc), logged in one line."""
    method = loaded.cfg.training.method
    where = f"eval: {loaded.model_name} + {adapter} on {loaded.device}; a {method} run"
    if method == "reward":
        log(f"{where}: the reward model on the preference pairs of {eval_file}")
        scored = {"reward": reward_scores(loaded, eval_file)}
        log(
            f"holdout perplexity: skipped (a reward model is not a language model); reward accuracy "
            f"{scored['reward']['accuracy']:.3f}, mean margin {scored['reward']['margin']:.3f}"
        )
        return scored
    if method == "kto" and _holdout_kind(eval_file) == "kto":
        log(f"{where}: KTO records of {eval_file}")
        scored = {"kto": kto_scores(loaded, eval_file)}
        acc = scored["kto"]["accuracy"]
        log(
            f"holdout perplexity: skipped (the eval_file holds KTO records); desirable above the undesirable "
            f"mean: {'n/a' if acc is None else f'{acc:.3f}'}"
        )
        return scored
    log(f"{where}: preference pairs of {eval_file}")
    scored = {"preference": preference_scores(loaded, eval_file)}
    log(
        f"holdout perplexity: skipped (the eval_file holds preference pairs); preference accuracy: base "
        f"{scored['preference']['accuracy']['base']:.3f} -> tuned {scored['preference']['accuracy']['tuned']:.3f}"
    )
    return scored


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def alignment_markdown(report: dict) -> list[str]:
    """The eval.md sections of a reward run's and a KTO-record holdout's metrics (none for other reports)."""
    lines = []
    if "reward" in report:
        r = report["reward"]
        lines += [
            "## Reward model",
            "",
            "| metric | reward model |",
            "|---|---|",
            f"| reward accuracy | {_percent(r['accuracy'])} |",
            f"| mean margin r(chosen) - r(rejected) | {_number(r['margin'])} |",
            f"| mean reward, chosen / rejected | {_number(r['chosen_reward'])} / {_number(r['rejected_reward'])} |",
            "",
            f"{r['pairs']} holdout pairs of `{r['eval_file']}` (max {r['max_seq_len']} tokens each, {r['dropped']} "
            f"dropped that do not fit). The reward is the scalar head on the final hidden state of the answer's "
            f"last token, with the reward adapter on; accuracy is the share of pairs whose chosen answer scores "
            f"higher.",
            "",
        ]
    if "kto" in report:
        k = report["kto"]
        lines += [
            "## Desirable and undesirable completions (KTO)",
            "",
            "| metric | tuned against base |",
            "|---|---|",
            f"| desirable above the undesirable mean | {_percent(k['accuracy'])} |",
            f"| mean log-ratio, desirable / undesirable (nats) | {_number(k['desirable_logratio'])} / "
            f"{_number(k['undesirable_logratio'])} |",
            f"| margin (nats) | {_number(k['margin'])} |",
            "",
            f"{k['desirable']} desirable and {k['undesirable']} undesirable holdout completions of `{k['eval_file']}` "
            f"(max {k['max_seq_len']} tokens each, {k['dropped']} dropped that do not fit). The log-ratio of a "
            f"completion is log p_tuned - log p_base summed over its tokens (base: the adapter switched off); a "
            f"desirable completion counts when its log-ratio is above the undesirable completions' mean.",
            "",
        ]
    return lines
