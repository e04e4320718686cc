"""What the RL trainers (train/grpo.py, train/ppo.py) share: prompts, rollouts, rewards, the reference
and the holdout evaluation, on the platform's Trainer.

    class GRPOTrainer(RLTrainer):
        method = "grpo"
        def _loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]: ...

Everything runs on one 4-bit base in memory. The policy is the LoRA adapter being trained; the
reference policy is the same base with the adapter switched off (`model.disable_adapter()`); a
reward model, when alignment.reward_adapter is set, is a second frozen adapter with its scalar
head on the same base (models/reward_model.py).

Data: the prompts of data.train_file and data.eval_file, of any record kind (prompt-only records,
or the prompts of SFT records, pairs or KTO records; each distinct prompt once), cut from the
left to data.max_seq_len - alignment.max_new_tokens tokens. A step's micro-batch of
training.batch_size prompts is one rollout (models/rollout.py): alignment.num_generations answers
per prompt sampled from the policy at alignment.temperature, at most alignment.max_new_tokens
tokens each, ending at EOS. Its sampling generator is seeded from training.seed, the step and
the micro-batch's index in the step, so a resumed run samples what an uninterrupted run samples.
The answers' rewards are the sum of alignment.reward_functions and the reward model's score
(models/rewards.py). The policy's log-probabilities of the answer tokens come from one forward
with gradients; their detached copy is the "old" policy of the clipped ratio (one optimisation
pass per rollout, so the ratio is 1 and the clipping never acts; the clipped form is the one
several passes would need), and the reference's come from a forward without gradients, adapter
off. Each trainer turns these into its loss (`_loss`); the loss of a micro-batch is its mean over
answer tokens, weighted by its share of the step's prompts.

Logged per window: reward (mean), reward_std, kl (the k3 estimate averaged over answer tokens),
answer_tokens (mean answer length), clip_fraction, and what `_loss` adds. The holdout
evaluation samples one answer per holdout prompt (seeded from the step) and reports the mean
reward (eval_reward) and KL (eval_kl).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..models.loader import load_tokenizer
from ..models.rewards import load_reward_functions, total_rewards
from ..models.rollout import (
    HOLDOUT_PART,
    HOLDOUT_PROMPTS,
    AnswerScores,
    Rollout,
    answer_logps,
    eos_token_ids,
    kl_estimate,
    load_prompts,
    masked_mean,
    prompt_text,
    rollout_seed,
    sample_answers,
)
from .preference import check_record_kind
from .trainer import Trainer

REWARD_KEYS = "alignment.reward_functions (e.g. [qlora_platform.models.rewards:brevity]) or alignment.reward_adapter"


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`values` shifted to mean 0 and scaled to variance 1 over the positions where `mask` is 1."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps)


@dataclass
class RolloutBatch:
    """One micro-batch's rollout with everything its loss needs."""

    roll: Rollout
    rewards: torch.Tensor  # [N] float32, on the model's device
    policy: AnswerScores  # with gradients
    reference: torch.Tensor  # [N, T] no gradients
    group: int  # answers per prompt, consecutive

    @property
    def mask(self) -> torch.Tensor:
        return self.roll.answer_mask.to(self.reference.device)

    @property
    def kl(self) -> torch.Tensor:
        """[N, T] the per-token KL estimate, without gradients (0 after each answer's end)."""
        return kl_estimate(self.policy.logps.detach(), self.reference) * self.mask


@dataclass
class _Window:
    """Rollout statistics of the steps since the last log line."""

    rewards: list[torch.Tensor] = field(default_factory=list)
    lengths: list[torch.Tensor] = field(default_factory=list)
    kl_sum: float = 0.0
    tokens: float = 0.0
    extra: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> (value, weight)

    def add(self, batch: RolloutBatch, stats: dict) -> None:
        tokens = float(batch.mask.sum())
        self.rewards.append(batch.rewards.detach().float().cpu())
        self.lengths.append(batch.roll.lengths.float().cpu())
        self.kl_sum += float(batch.kl.sum())
        self.tokens += tokens
        for name, value in stats.items():
            self.extra.setdefault(name, []).append((float(value), tokens))

    def take(self) -> dict:
        if not self.rewards:
            return {}
        rewards = torch.cat(self.rewards)
        out = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "kl": self.kl_sum / max(self.tokens, 1.0),
            "answer_tokens": float(torch.cat(self.lengths).mean()),
        }
        for name, pairs in self.extra.items():
            weight = sum(w for _, w in pairs)
            out[name] = sum(v * w for v, w in pairs) / weight if weight else 0.0
        self.rewards, self.lengths, self.kl_sum, self.tokens, self.extra = [], [], 0.0, 0.0, {}
        return out


class RLTrainer(Trainer):
    """The Trainer with prompts as data and sampled answers as what it learns from (module doc);
    subclasses set `method` and define `_loss`."""

    method = ""
    value_head = False  # whether `_loss` needs the last hidden states (PPO's value head)

    # -- set-up ------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg, al, method = self.cfg, self.cfg.alignment, self.method
        if not al.reward_functions and not al.reward_adapter:
            raise UserError(
                f"training.method {method} needs a reward: set {REWARD_KEYS} (a reward run's final_adapter)"
            )
        if al.reward_adapter and not Path(al.reward_adapter).is_dir():
            raise UserError(
                f"alignment.reward_adapter '{al.reward_adapter}' does not exist; give the final_adapter folder of a "
                f"training.method reward run"
            )
        self.reward_functions = load_reward_functions(al.reward_functions)
        for what in ("train_file", "eval_file"):
            check_record_kind(getattr(cfg.data, what), what, method)
        room = cfg.data.max_seq_len - al.max_new_tokens
        if room < 1:
            raise UserError(
                f"alignment.max_new_tokens {al.max_new_tokens} leaves no room for a prompt in data.max_seq_len "
                f"{cfg.data.max_seq_len}; raise data.max_seq_len or lower alignment.max_new_tokens"
            )
        if not cfg.data.train_file:
            raise UserError(f"training.method {method} needs prompts: set data.train_file")
        train_prompts = load_prompts(cfg.data.train_file, "train_file")
        eval_prompts = load_prompts(cfg.data.eval_file, "eval_file") if cfg.data.eval_file else []
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_examples = [self._encode(p, room) for p in train_prompts]
        self.eval_examples = [self._encode(p, room) for p in eval_prompts]
        truncated = self._count_data(len(train_prompts), 0)
        self.log(
            f"data: {len(self.train_examples)} training prompts ({truncated} cut to {room} tokens to leave "
            f"alignment.max_new_tokens {al.max_new_tokens}), {len(self.eval_examples)} holdout prompts (the "
            f"evaluation samples the first {min(len(self.eval_examples), HOLDOUT_PROMPTS)}); "
            f"{al.num_generations} answers per prompt"
        )
        if not self.train_examples:
            raise UserError(f"no prompt ending with a user message in '{cfg.data.train_file}'")
        self._window = _Window()
        self._part_step, self._part = -1, 0

    def _encode(self, prompt: list[dict], room: int) -> dict:
        from ..data.preference_tokenize import encode_prompt

        ex = encode_prompt(self.tokenizer, {"prompt": prompt}, room)
        return {**ex, "prompt_text": prompt_text(prompt)}

    def _lengths_and_weights(self) -> tuple[list[int], list[int]]:
        """Each prompt is planned by its length plus the longest answer, and weighs one in the loss."""
        extra = self.cfg.alignment.max_new_tokens
        return [len(ex["prompt_input_ids"]) + extra for ex in self.train_examples], [1] * len(self.train_examples)

    def _setup_model(self) -> None:
        """The model, then the reward model (a second adapter on the same base) when one is set."""
        super()._setup_model()
        self.eos_ids = eos_token_ids(self.tokenizer, self.model)
        # The training fast kernels keep no KV cache: sampling then recomputes the whole sequence.
        self.use_cache = not (self.resolved.fast_kernels and self.strategy.fast_path)
        self.reward_model = None
        if self.cfg.alignment.reward_adapter:
            from ..models.reward_model import RewardModel

            start = time.time()
            self.reward_model = RewardModel.attach(self.model, self.cfg.alignment.reward_adapter)
            self.log(f"reward model: {self.cfg.alignment.reward_adapter} in {time.time() - start:.1f} s")

    def _save_extra(self, folder: Path) -> None:
        """PEFT saves every adapter of the model, the reward model's too (in a subfolder named after
        it): it belongs to its own run, so this run's checkpoints and final adapter leave it out."""
        if self.reward_model is not None:
            from ..models.reward_model import REWARD_ADAPTER

            shutil.rmtree(Path(folder) / REWARD_ADAPTER, ignore_errors=True)

    # -- rollouts ----------------------------------------------------------------------
    def _generator(self, part: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(rollout_seed(self.cfg.training.seed, self.step, part))

    def _next_part(self) -> int:
        """The index of this micro-batch in its step (0 at each step's first)."""
        if self._part_step != self.step:
            self._part_step, self._part = self.step, 0
        self._part += 1
        return self._part - 1

    def _sample(self, examples: list[dict], group: int, generator: torch.Generator) -> tuple[Rollout, torch.Tensor]:
        """`group` answers per prompt (consecutive) and their rewards ([N] float32 on the model's device)."""
        al = self.cfg.alignment
        roll = sample_answers(
            self.model,
            [ex["prompt_input_ids"] for ex in examples for _ in range(group)],
            max_new_tokens=al.max_new_tokens,
            temperature=al.temperature,
            eos_ids=self.eos_ids,
            pad_id=self.tokenizer.pad_token_id,
            generator=generator,
            use_cache=self.use_cache,
        )
        prompts = [ex["prompt_text"] for ex in examples for _ in range(group)]
        ids, mask = roll.scoring_batch(self.tokenizer.pad_token_id) if self.reward_model else (None, None)
        rewards = total_rewards(
            self.reward_functions, prompts, roll.texts(self.tokenizer), self.reward_model, ids, mask
        )
        return roll, rewards.to(roll.input_ids.device)

    def _reference(self, roll: Rollout) -> torch.Tensor:
        with torch.no_grad(), self.model.disable_adapter():
            return answer_logps(self.model, roll, self.cfg.alignment.temperature).logps

    def _forward_backward(self, rows, n_label_window: int) -> tuple[torch.Tensor, int]:
        """One rollout of the micro-batch's prompts, its loss (mean over answer tokens) weighted by the
        micro-batch's share of the window's prompts, and its gradients."""
        examples = [self.train_examples[i] for row in rows for i in row]
        group = self.cfg.alignment.num_generations
        roll, rewards = self._sample(examples, group, self._generator(self._next_part()))
        reference = self._reference(roll)
        policy = answer_logps(self.model, roll, self.cfg.alignment.temperature, hidden=self.value_head)
        batch = RolloutBatch(roll=roll, rewards=rewards, policy=policy, reference=reference, group=group)
        loss, stats = self._loss(batch)
        weighted = loss * (len(examples) / max(n_label_window, 1))
        weighted.backward()
        self._window.add(batch, stats)
        return weighted.detach(), int(roll.attention_mask.sum())

    def _loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """(the micro-batch's loss, averaged over its answer tokens; token-weighted statistics to log)."""
        raise NotImplementedError

    def _window_metrics(self) -> dict:
        return self._window.take()

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean reward and KL to the reference of one sampled answer for each of the first
        HOLDOUT_PROMPTS holdout prompts."""
        if not self.eval_examples:
            return None
        examples = self.eval_examples[:HOLDOUT_PROMPTS]
        was_training = self.model.training
        self.model.eval()
        generator = self._generator(HOLDOUT_PART)
        rewards, lengths, kl_sum, tokens = [], [], 0.0, 0.0
        size, temperature = self.cfg.training.batch_size, self.cfg.alignment.temperature
        try:
            for k in range(0, len(examples), size):
                roll, reward = self._sample(examples[k : k + size], 1, generator)
                policy = answer_logps(self.model, roll, temperature).logps
                kl = kl_estimate(policy, self._reference(roll)) * roll.answer_mask
                rewards.append(reward.float().cpu())
                lengths.append(roll.lengths.float().cpu())
                kl_sum, tokens = kl_sum + float(kl.sum()), tokens + float(roll.answer_mask.sum())
        finally:
            self.model.train(was_training)
        reward = torch.cat(rewards)
        return {
            "reward": float(reward.mean()),
            "reward_std": float(reward.std()) if len(reward) > 1 else 0.0,
            "kl": kl_sum / max(tokens, 1.0),
            "answer_tokens": float(torch.cat(lengths).mean()),
            "prompts": len(reward),
        }

    def _eval_record(self, result: dict) -> dict:
        return {"eval_reward": result["reward"], "eval_kl": result["kl"]}

    def _eval_summary(self, result: dict | None) -> dict:
        out = {"eval_loss": None, "eval_perplexity": None, "eval_reward": None, "eval_kl": None}
        if result:
            out.update(self._eval_record(result))
        out["method"] = self.method
        return out
