"""Sampled answers and their token log-probabilities: the rollouts of RL training (train/rl.py for
training.method grpo and ppo) and of `qlora eval` for such runs (eval/rl.py).

    gen = torch.Generator().manual_seed(rollout_seed(seed, step, 0))
    roll = sample_answers(model, prompts, max_new_tokens=64, temperature=1.0, eos_ids={2}, pad_id=0, generator=gen)
    policy = answer_logps(model, roll, temperature=1.0).logps          # [N, T], with grad
    with model.disable_adapter(): reference = answer_logps(model, roll, 1.0).logps
    kl = kl_estimate(policy, reference)                                  # [N, T], k3 per token

A rollout holds N answers, each sampled token by token from softmax(logits / temperature) with
an explicit torch.Generator (so a resumed run samples what an uninterrupted one sampled), until
the end-of-turn (EOS) or max_new_tokens. The prompts are left-padded to one width P, so every
answer starts at column P; after an answer's EOS its row holds pads that the attention mask and
`answer_mask` leave out. An answer's tokens run through its EOS (the EOS is a choice the policy
made, as SFT's labels include it); an answer cut at max_new_tokens has no EOS.

The log-probability of an answer token is taken under the same temperature the sampler used
(the distribution the token came from), for the policy and for the reference alike. The KL
estimate per token is Schulman's k3, exp(r - p) - (r - p) - 1 with p, r the policy's and the
reference's log-probabilities of the sampled token: never negative, and its mean over tokens
sampled from the policy estimates KL(policy || reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEED_STRIDE = 1_000_003  # seeds of different runs (training.seed) and steps never coincide below this
PART_STRIDE = 1_009  # rollouts of one step: its micro-batches 0.., and HOLDOUT_PART for the holdout evaluation
HOLDOUT_PART = 1_000
# Prompts an RL holdout evaluation samples (training's and `qlora eval`'s): sampling is the slow
# part of RL, and a few prompts, the same ones every time, show the trend.
HOLDOUT_PROMPTS = 16


def rollout_seed(seed: int, step: int, part: int) -> int:
    """The generator seed of a step's `part`-th rollout (a micro-batch index, or HOLDOUT_PART)."""
    return (seed * SEED_STRIDE + step * PART_STRIDE + part) % (2**63)


@dataclass
class Rollout:
    """N sampled answers after their left-padded prompts (module doc)."""

    input_ids: torch.Tensor  # [N, P + T] prompt (left-padded), answer, pads after the answer's end
    attention_mask: torch.Tensor  # [N, P + T] 1 on prompt and answer tokens
    prompt_width: int  # P: every answer starts at this column
    answer_mask: torch.Tensor  # [N, T] float, 1 on answer tokens (through EOS)
    prompt_ids: list[list[int]]  # each answer's prompt, unpadded
    finished: torch.Tensor  # [N] bool: the answer ended with EOS (not cut at max_new_tokens)

    @property
    def answer_tokens(self) -> torch.Tensor:
        """[N, T] the answers' token ids (pads after each answer's end)."""
        return self.input_ids[:, self.prompt_width :]

    @property
    def lengths(self) -> torch.Tensor:
        """[N] tokens of each answer (its EOS included)."""
        return self.answer_mask.sum(1).long()

    def answer_ids(self) -> list[list[int]]:
        """Each answer's token ids through its EOS, unpadded."""
        return [row[:n].tolist() for row, n in zip(self.answer_tokens.cpu(), self.lengths.tolist())]

    def texts(self, tokenizer) -> list[str]:
        """Each answer as text, special tokens (the EOS) left out."""
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in self.answer_ids()]

    def scoring_batch(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of prompt + answer rows right-padded, the layout a reward model
        is trained on (data/preference_tokenize.py: prompt ids, then the answer through EOS)."""
        rows = [p + a for p, a in zip(self.prompt_ids, self.answer_ids())]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = self.input_ids.device
        return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding skipped)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def eos_token_ids(tokenizer, model=None) -> set[int]:
    """The tokens that end an answer: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of prompts left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def sample_answers(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    pad_id: int,
    generator: torch.Generator,
    use_cache: bool = True,
) -> Rollout:
    """One sampled answer per prompt (repeat a prompt for several), in eval mode without gradients;
    the model's train/eval mode is restored. `use_cache=False` recomputes the whole sequence at every
    token, for layers that keep no KV cache (the training fast kernels)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
        width, n = ids.size(1), ids.size(0)
        eos = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        live_cols: list[torch.Tensor] = []
        cache = None
        for _ in range(max_new_tokens):
            pos = positions(mask)
            if cache is None:
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, logits_to_keep=1)
            else:
                out = model(
                    input_ids=ids[:, -1:],
                    attention_mask=mask,
                    position_ids=pos[:, -1:],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            cache = out.past_key_values if use_cache else None
            probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            live = ~finished
            token = torch.where(live, token, torch.full_like(token, pad_id))
            live_cols.append(live)
            finished = finished | (live & torch.isin(token, eos))
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, live.long()[:, None]], dim=1)
            if bool(finished.all()):
                break
        answer_mask = torch.stack(live_cols, dim=1).float()
    finally:
        model.train(was_training)
    return Rollout(
        input_ids=ids,
        attention_mask=mask,
        prompt_width=width,
        answer_mask=answer_mask,
        prompt_ids=[list(p) for p in prompts],
        finished=finished,
    )


@dataclass
class AnswerScores:
    logps: torch.Tensor  # [N, T] float32 log-probabilities of the answer tokens (0 after the end)
    hidden: torch.Tensor | None  # [N, T, H] last hidden state at the position that predicts each answer token


def answer_logps(model, roll: Rollout, temperature: float, hidden: bool = False) -> AnswerScores:
    """Log-probabilities of the rollout's answer tokens under `model` (gradients as the caller allows);
    with `hidden`, the last hidden states that predict them (what a value head reads)."""
    t = roll.answer_mask.size(1)
    out = model(
        input_ids=roll.input_ids,
        attention_mask=roll.attention_mask,
        position_ids=positions(roll.attention_mask),
        use_cache=False,
        logits_to_keep=t + 1,
        output_hidden_states=hidden,
    )
    logits = out.logits[:, :-1].float() / temperature  # column P - 1 + k predicts answer token k
    tokens = roll.answer_tokens.to(logits.device)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * roll.answer_mask.to(logits.device)
    states = None
    if hidden:
        p = roll.prompt_width
        states = out.hidden_states[-1][:, p - 1 : p - 1 + t]
    return AnswerScores(logps=logps, hidden=states)


def kl_estimate(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(r - p) - (r - p) - 1 (module doc)."""
    diff = reference - policy
    return torch.exp(diff) - diff - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def prompt_text(messages: list[dict]) -> str:
    """What a reward function sees as an answer's prompt: the content of its last user message."""
    return next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")


def load_prompts(path: str, what: str) -> list[list[dict]]:
    """The prompts of a JSONL file of any record kind, each once, in file order: a prompt-only record's
    prompt, a pair's or KTO record's prompt, an SFT conversation's messages before its last answer."""
    import json
    from pathlib import Path

    from ..data.preference import read_kind_lines
    from ..errors import UserError

    if not Path(path).is_file():
        raise UserError(f"{what} '{path}' does not exist; run 'qlora prepare' first or set data.{what}")
    errors: list[str] = []
    kind, records = read_kind_lines(path, errors)
    if errors:
        raise UserError(f"{errors[0]} (run 'qlora validate {path}' for every problem)")
    if not records:
        raise UserError(f"{what} '{path}' has no records")
    out, seen = [], set()
    for _, record in records:
        if kind == "sft":
            messages = record["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            prompt = messages[:last]
        else:
            prompt = record["prompt"]
        key = json.dumps(prompt, sort_keys=True)
        if prompt and prompt[-1]["role"] == "user" and key not in seen:
            seen.add(key)
            out.append(prompt)
    return out
