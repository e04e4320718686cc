"""Sampling settings and the per-step token choice of the generation engine.

    params = SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.9, seed=1)
    params.validate(context_len=2048, prompt_len=40)     # UserError on bad values
    next_ids = choose_next(logits, params, history, generator)

Temperature 0 is greedy, and so is any temperature below `MIN_TEMPERATURE` (dividing
by it would overflow the logits). Repetition penalty follows the CTRL/Hugging Face rule
(positive logits divided by the penalty, negative ones multiplied) over every
token already in the row, prompt included, so results match `generate`. A row whose
probabilities are not finite (a model that overflowed, an extreme setting) takes its
argmax instead of failing the sampler, so one row can never break a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError

MIN_TEMPERATURE = 1e-5  # below: greedy
MIN_REPETITION_PENALTY = 0.01  # below, penalised logits overflow float32
SEED_RANGE = (-(2**63), 2**63 - 1)
# What an interactive chat samples with (qlora chat, generate, the UI's Chat tab) unless told otherwise.
CHAT_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self, context_len: int | None = None, prompt_len: int | None = None) -> SamplingParams:
        checks = [
            (self.max_new_tokens >= 1, f"max_tokens must be at least 1 (got {self.max_new_tokens})"),
            (0 <= self.temperature <= 2, f"temperature must be between 0 and 2 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be 0 (off) or positive (got {self.top_k})"),
            (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10,
                f"repetition_penalty must be between {MIN_REPETITION_PENALTY} and 10 (got {self.repetition_penalty})",
            ),
            (
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                f"seed must be a 64-bit signed integer (got {self.seed})",
            ),
            (
                len(self.stop) <= 8 and all(isinstance(s, str) and s for s in self.stop),
                "stop must be at most 8 non-empty strings",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if context_len is not None and prompt_len is not None and prompt_len + self.max_new_tokens > context_len:
            raise UserError(
                f"the prompt has {prompt_len} tokens and max_tokens is {self.max_new_tokens}: "
                f"{prompt_len + self.max_new_tokens} is over the model's context of "
                f"{context_len} tokens; shorten the prompt or lower max_tokens"
            )
        return self


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); history (B, T) token ids already seen (padding may repeat real ids)."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def choose_next(
    logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row: logits (B, V) of the last position -> ids (B,)."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    best = logits.nan_to_num(nan=float("-inf")).argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    # A row with inf/NaN probabilities gets its argmax as a one-hot distribution: decided on the
    # device (no sync), and torch.multinomial never sees a value it rejects.
    broken = ~torch.isfinite(probs).all(dim=-1, keepdim=True) | (probs.sum(dim=-1, keepdim=True) <= 0)
    fallback = torch.zeros_like(probs).scatter_(1, best.unsqueeze(1), 1.0)
    probs = torch.where(broken, fallback, probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
