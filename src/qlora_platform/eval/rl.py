"""RL metrics of a PPO or GRPO run for `qlora eval`: the reward of sampled answers, base against tuned,
and how far the tuned answers moved from the base.

    rl = rl_scores(loaded, "data/rl/eval.jsonl", trust_remote_code=False)   # loaded: infer.load.load_for_inference
    rl["reward"]["base"], rl["reward"]["tuned"], rl["kl"]

On the first MAX_PROMPTS distinct prompts of the holdout file (any record kind, as training reads
them), one answer per prompt is sampled from the base (adapter off) and one from the tuned model,
at the run's alignment.temperature, at most min(alignment.max_new_tokens, MAX_NEW_TOKENS) tokens,
with the same seeded generator for both (models/rollout.py). Each answer's reward is what training
summed (models/rewards.py): alignment.reward_functions and the reward model of
alignment.reward_adapter. `kl` is the k3 estimate of KL(tuned || base) averaged over the tuned
answers' tokens, as training logs it.

A reward function named in the run's config is Python code, and an adapter folder may come from
anywhere: functions outside qlora_platform run only with --trust-remote-code on the command line
(others are listed as skipped). Without any reward source left, the rewards are None.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..models.loader import training_numerics
from ..models.rewards import is_builtin, load_reward_functions, total_rewards
from ..models.rollout import (
    HOLDOUT_PROMPTS,
    Rollout,
    answer_logps,
    eos_token_ids,
    kl_estimate,
    load_prompts,
    prompt_text,
    sample_answers,
)

MAX_PROMPTS = HOLDOUT_PROMPTS  # a few holdout prompts, one answer each per model
MAX_NEW_TOKENS = 64
BATCH = 8  # prompts sampled together (at least; more when training used larger batches)
SEED = 0  # added to training.seed: base and tuned sample with the same generator state

DEFINITION = (
    "reward: mean over holdout prompts of one sampled answer's reward (the sum of the run's reward functions and "
    "reward model), base = adapter off; kl: k3 estimate exp(b - t) - (b - t) - 1 of the tuned answers' tokens "
    "(t, b: their log-probabilities under tuned and base at the sampling temperature), averaged over answer tokens"
)


def _reward_sources(loaded, trust_remote_code: bool, log) -> tuple[list, object, list[str], list[str]]:
    """(functions, reward model or None, the sources used, the sources skipped with why)."""
    al = loaded.cfg.alignment
    allowed = [s for s in al.reward_functions if trust_remote_code or is_builtin(s)]
    skipped = [
        f"{s} (not run: code named by an adapter's config runs only with --trust-remote-code)"
        for s in al.reward_functions
        if s not in allowed
    ]
    functions = load_reward_functions(allowed)
    model = None
    if al.reward_adapter:
        if Path(al.reward_adapter).is_dir():
            from ..models.reward_model import RewardModel

            model = RewardModel.attach(loaded.model, al.reward_adapter)
        else:
            skipped.append(f"{al.reward_adapter} (reward adapter not found from {Path.cwd()})")
    for line in skipped:
        log(f"eval: reward source skipped: {line}")
    used = [*allowed, *([f"reward model {al.reward_adapter}"] if model is not None else [])]
    return functions, model, used, skipped


def _rollout_rewards(loaded, roll: Rollout, prompts: list[str], functions, reward_model) -> torch.Tensor | None:
    if not functions and reward_model is None:
        return None
    tok = loaded.tokenizer
    ids, mask = roll.scoring_batch(tok.pad_token_id) if reward_model is not None else (None, None)
    return total_rewards(functions, prompts, roll.texts(tok), reward_model, ids, mask)


def rl_scores(
    loaded, eval_file: str, trust_remote_code: bool = False, batch_size: int | None = None, log=print
) -> dict:
    """Mean reward of base and tuned answers and the tuned answers' KL to the base (module doc)."""
    cfg, tok, al = loaded.cfg, loaded.tokenizer, loaded.cfg.alignment
    prompts = load_prompts(eval_file, "eval_file")[:MAX_PROMPTS]
    if not prompts:
        raise UserError(f"no holdout prompt ending with a user message in '{eval_file}'")
    from ..data.preference_tokenize import encode_prompt

    new_tokens = min(al.max_new_tokens, MAX_NEW_TOKENS)
    room = max(1, cfg.data.max_seq_len - new_tokens)
    ids = [encode_prompt(tok, {"prompt": p}, room)["prompt_input_ids"] for p in prompts]
    texts = [prompt_text(p) for p in prompts]
    size = batch_size or max(BATCH, cfg.training.batch_size)
    functions, reward_model, used, skipped = _reward_sources(loaded, trust_remote_code, log)
    eos = eos_token_ids(tok, loaded.model)
    sums = {"base": [], "tuned": []}
    lengths = {"base": [], "tuned": []}
    kl_sum, kl_tokens = 0.0, 0.0
    device = next(loaded.model.parameters()).device
    try:
        # The 4-bit numerics training used, before any generation repacks the layers.
        with training_numerics(loaded.model), torch.no_grad():
            for side in ("base", "tuned"):
                generator = torch.Generator(device=device).manual_seed(cfg.training.seed + SEED)
                for k in range(0, len(ids), size):
                    sample = dict(
                        max_new_tokens=new_tokens,
                        temperature=al.temperature,
                        eos_ids=eos,
                        pad_id=tok.pad_token_id,
                        generator=generator,
                    )
                    if side == "base":
                        with loaded.base_only():
                            roll = sample_answers(loaded.model, ids[k : k + size], **sample)
                    else:
                        roll = sample_answers(loaded.model, ids[k : k + size], **sample)
                        tuned = answer_logps(loaded.model, roll, al.temperature).logps
                        with loaded.base_only():
                            base = answer_logps(loaded.model, roll, al.temperature).logps
                        mask = roll.answer_mask.to(tuned.device)
                        kl_sum += float((kl_estimate(tuned, base) * mask).sum())
                        kl_tokens += float(mask.sum())
                    rewards = _rollout_rewards(loaded, roll, texts[k : k + size], functions, reward_model)
                    if rewards is not None:
                        sums[side].append(rewards)
                    lengths[side].append(roll.lengths.float().cpu())
    finally:
        if reward_model is not None:
            from ..models.reward_model import REWARD_ADAPTER

            loaded.model.delete_adapter(REWARD_ADAPTER)
    reward = {side: float(torch.cat(v).mean()) if v else None for side, v in sums.items()}
    return {
        "reward": reward,
        "kl": kl_sum / max(kl_tokens, 1.0),
        "answer_tokens": {side: float(torch.cat(v).mean()) for side, v in lengths.items()},
        "prompts": len(prompts),
        "max_new_tokens": new_tokens,
        "temperature": al.temperature,
        "reward_sources": used,
        "skipped": skipped,
        "eval_file": str(eval_file),
        "method": DEFINITION,
    }


def rl_markdown(rl: dict) -> list[str]:
    """The eval.md section of the RL metrics."""
    reward, length = rl["reward"], rl["answer_tokens"]

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        "## Sampled answers (RL)",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        f"| mean reward | {cell(reward['base'])} | {cell(reward['tuned'])} |",
        f"| mean answer length (tokens) | {length['base']:.1f} | {length['tuned']:.1f} |",
        f"| KL to the base (per answer token) | | {rl['kl']:.4f} |",
        "",
        f"One answer per prompt for {rl['prompts']} holdout prompts of `{rl['eval_file']}`, sampled at temperature "
        f"{rl['temperature']}, at most {rl['max_new_tokens']} tokens, base (adapter off) and tuned from the same "
        f"seed. Reward: the sum of {', '.join(rl['reward_sources']) or 'no source'}. KL: the k3 estimate of "
        f"KL(tuned || base) over the tuned answers' tokens.",
        "",
    ]
    if rl["skipped"]:
        lines += [f"Skipped reward sources: {'; '.join(rl['skipped'])}.", ""]
    return lines
