"""What GRPO and PPO share (train/rl.py, models/rollout.py): the KL estimate, whitening, seeded
rollouts with their masks and log-probabilities, the prompts of any record kind, and the set-up errors.

`eos_model_dir` (imported by the other RL tests) is the tiny random Llama with its output head untied
and the end-of-turn token's row pointed along a direction all final hidden states share, so that EOS is
sampled now and then (about one token in seven) and answer length is something a few RL steps can change.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.models.rollout import (
    answer_logps,
    kl_estimate,
    load_prompts,
    masked_mean,
    rollout_seed,
    sample_answers,
)
from qlora_platform.train.methods import make_trainer
from qlora_platform.train.rl import RLTrainer, whiten
from tests.conftest import chat, tiny_run_config, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
BREVITY = "[qlora_platform.models.rewards:brevity]"


def _quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture(scope="session")
def eos_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with EOS sampled about one token in seven (module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        states = []
        for w in WORDS[:4]:  # final hidden states of prompts and of random answers after them
            prompt = [{"role": "user", "content": f"Say {w}."}]
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt").input_ids
            ids = torch.cat([ids, torch.randint(0, len(tok), (1, 8), generator=generator)], dim=1)
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0])
        hidden = torch.cat(states)
        # The direction along which the states' projection is large and steady (a ridge-regularised
        # Fisher direction), so that EOS gets a similar share of the probability everywhere.
        direction = torch.linalg.solve(torch.cov(hidden.T) + 0.1 * torch.eye(hidden.size(1)), hidden.mean(0))
        direction = direction / direction.norm()
        head = model.get_input_embeddings().weight.detach().clone()
        others = torch.logsumexp(hidden @ head.T, dim=-1)
        scale = next(
            s for s in torch.linspace(0, 10, 201) if (hidden @ (s * direction) - others).sigmoid().mean() > 0.15
        )
        head[tok.eos_token_id] = scale * direction
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(head.size(1), head.size(0), bias=False)
    model.lm_head.weight.data = head
    out = tmp_path_factory.mktemp("tiny-eos")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def prompt_files(folder: Path, n_train: int = 8, n_held: int = 2) -> tuple[Path, Path]:
    train = [{"prompt": [{"role": "user", "content": f"Say {w}."}]} for w in WORDS[:n_train]]
    held = [{"prompt": [{"role": "user", "content": f"Tell me {w}."}]} for w in WORDS[:n_held]]
    return write_jsonl(folder / "prompts_train.jsonl", train), write_jsonl(folder / "prompts_eval.jsonl", held)


@pytest.fixture(autouse=True)
def restore_threads():
    """The RL runs here train on one thread (`rl_config`); the tests after them get the count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def rl_config(model_dir: Path, folder: Path, method: str, **overrides):
    """A seconds-long RL run on the CPU: 2 prompts a step, 4 answers each, at most 8 tokens. One
    thread: on two CPU cores shared with other work, a second thread mostly waits (a step takes
    about twenty times longer with two)."""
    folder.mkdir(parents=True, exist_ok=True)
    train, held = prompt_files(folder)
    return tiny_run_config(
        model_dir,
        train,
        held,
        folder / "run",
        **{
            "training.method": method,
            "training.batch_size": 2,
            "training.learning_rate": 5e-3,
            "training.max_steps": 4,
            "training.num_threads": 1,
            "alignment.reward_functions": BREVITY,
            "alignment.num_generations": 4,
            "alignment.max_new_tokens": 8,
            **overrides,
        },
    )


# -- formulas ---------------------------------------------------------------------------------
def test_kl_estimate_is_k3_and_never_negative():
    policy, reference = torch.tensor([-1.0, -2.0, -0.3]), torch.tensor([-1.5, -1.0, -0.3])
    # r - p = -0.5, 1.0, 0: exp(-0.5) + 0.5 - 1, exp(1) - 1 - 1, 0
    expected = torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])
    assert torch.allclose(kl_estimate(policy, reference), expected, atol=1e-6)
    assert (kl_estimate(torch.randn(100), torch.randn(100)) >= 0).all()


def test_whiten_and_masked_mean_skip_masked_positions():
    values = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert float(masked_mean(values, mask)) == pytest.approx(4.0)  # (1 + 3 + 5 + 7) / 4
    # mean 4, variance (9 + 1 + 1 + 9) / 4 = 5
    white = whiten(values, mask)
    assert torch.allclose(white[:, :2], (values[:, :2] - 4.0) / math.sqrt(5.0), atol=1e-5)
    assert float(masked_mean(torch.ones(2, 2), torch.zeros(2, 2))) == 0.0


def test_rollout_seeds_differ_by_run_step_and_micro_batch():
    seeds = {rollout_seed(seed, step, part) for seed in (0, 1) for step in range(50) for part in (0, 1, 2, 1000)}
    assert len(seeds) == 2 * 50 * 4


# -- rollouts on the tiny model ---------------------------------------------------------------
@pytest.fixture
def grpo_trainer(eos_model_dir, tmp_path):
    return make_trainer(rl_config(eos_model_dir, tmp_path, "grpo"), log=_quiet)


def test_rollouts_are_seeded_masked_after_eos_and_scored_like_unpadded_rows(grpo_trainer):
    trainer = grpo_trainer
    model, tok = trainer.model, trainer.tokenizer
    prompts = [ex["prompt_input_ids"] for ex in trainer.train_examples[:4]]
    prompts[1] = prompts[1][3:]  # prompts of different lengths: left padding
    kw = {"max_new_tokens": 8, "temperature": 1.0, "eos_ids": trainer.eos_ids, "pad_id": tok.pad_token_id}
    assert model.training
    roll = sample_answers(model, prompts * 2, generator=torch.Generator().manual_seed(3), **kw)
    assert model.training  # sampled in eval mode, then put back
    again = sample_answers(model, prompts * 2, generator=torch.Generator().manual_seed(3), **kw)
    other = sample_answers(model, prompts * 2, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(roll.input_ids, again.input_ids) and not torch.equal(roll.input_ids, other.input_ids)
    # Without the KV cache (the fast kernels keep none) the same tokens come out.
    uncached = sample_answers(model, prompts * 2, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(roll.input_ids, uncached.input_ids)

    answers = roll.answer_ids()
    ended = [i for i, a in enumerate(answers) if len(a) < 8]
    assert ended, "some answers end with EOS before max_new_tokens"
    for i, ids in enumerate(answers):
        assert bool(roll.finished[i]) == (ids[-1] in trainer.eos_ids)
        assert roll.answer_mask[i].tolist() == [1.0] * len(ids) + [0.0] * (roll.answer_mask.size(1) - len(ids))
        assert roll.attention_mask[i, roll.prompt_width + len(ids) :].sum() == 0
    assert roll.texts(tok)[ended[0]] == tok.decode(answers[ended[0]][:-1])  # the EOS is left out

    # The log-probabilities of the padded batch are those of each row alone.
    with torch.no_grad():
        logps = answer_logps(model, roll, temperature=1.0).logps
        for i in (0, 1, ended[0]):
            row = torch.tensor([roll.prompt_ids[i] + answers[i]])
            alone = model(input_ids=row).logits[0, len(roll.prompt_ids[i]) - 1 : -1].float().log_softmax(-1)
            want = alone.gather(-1, torch.tensor(answers[i])[:, None]).squeeze(-1)
            assert torch.allclose(logps[i, : len(answers[i])], want, atol=1e-4)
            assert logps[i, len(answers[i]) :].abs().sum() == 0
    # Right-padded prompt + answer rows, as a reward model reads them.
    ids, mask = roll.scoring_batch(tok.pad_token_id)
    assert ids[ended[0], : int(mask[ended[0]].sum())].tolist() == roll.prompt_ids[ended[0]] + answers[ended[0]]


def test_at_step_zero_the_policy_is_the_reference(grpo_trainer):
    trainer = grpo_trainer
    roll, rewards = trainer._sample(trainer.train_examples[:2], 4, torch.Generator().manual_seed(0))
    assert rewards.shape == (8,) and rewards.dtype == torch.float32
    with torch.no_grad():
        policy = answer_logps(trainer.model, roll, 1.0).logps
    assert torch.allclose(policy, trainer._reference(roll), atol=1e-5)  # LoRA B starts at 0


# -- data and set-up errors ---------------------------------------------------------------------
def test_prompts_come_from_any_record_kind_once_each(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [chat("Say hi.", "hi"), chat("Say hi.", "hello"), chat("Say yo.", "yo")])
    assert load_prompts(str(sft), "train_file") == [
        [{"role": "user", "content": "Say hi."}],
        [{"role": "user", "content": "Say yo."}],
    ]
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "Q1", "chosen": "a", "rejected": "b"}, {"prompt": "Q1", "chosen": "c", "rejected": "d"}],
    )
    assert load_prompts(str(pairs), "train_file") == [[{"role": "user", "content": "Q1"}]]


def test_a_run_without_a_reward_is_one_line_naming_both_keys(eos_model_dir, tmp_path):
    cfg = rl_config(eos_model_dir, tmp_path, "grpo", **{"alignment.reward_functions": "[]"})
    with pytest.raises(UserError) as err:
        make_trainer(cfg, log=_quiet)
    text = str(err.value)
    assert "alignment.reward_functions" in text and "alignment.reward_adapter" in text and "\n" not in text


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"alignment.max_new_tokens": 96}, "leaves no room for a prompt"),
        ({"alignment.reward_adapter": "no/such/folder"}, "alignment.reward_adapter 'no/such/folder' does not exist"),
        ({"alignment.reward_functions": "[no_such_module_xyz:fn]"}, "no module 'no_such_module_xyz'"),
    ],
)
def test_rl_set_up_errors_are_one_line(eos_model_dir, tmp_path, overrides, needle):
    with pytest.raises(UserError) as err:
        make_trainer(rl_config(eos_model_dir, tmp_path, "ppo", **overrides), log=_quiet)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_both_rl_methods_are_rl_trainers(grpo_trainer):
    from qlora_platform.train.methods import trainer_class

    assert isinstance(grpo_trainer, RLTrainer)
    assert issubclass(trainer_class("ppo"), RLTrainer) and trainer_class("ppo").method == "ppo"


def bundled_rl_config(folder: Path, method: str, **overrides):
    """An RL run of the bundled SmolLM2 on the CPU: the same 2 prompts every step (one asks for a
    number, one for a word, so answer lengths vary), 4 answers each of at most 12 tokens, brevity
    as the reward. 16-bit: several times faster than the 4-bit path on the CPU."""
    from qlora_platform.config import load_config

    system = {"role": "system", "content": "Answer briefly."}  # shorter than the template's default
    questions = ["What is 2 plus 3? Reply with the number only.", "Name one color."]
    train = write_jsonl(
        folder / "prompts.jsonl", [{"prompt": [system, {"role": "user", "content": q}]} for q in questions]
    )
    return load_config(
        None,
        {
            "model.name": "bundled:smollm2-135m-instruct",
            "quantization.load_in_4bit": "false",
            "lora.dropout": "0.0",
            "data.train_file": str(train),
            "data.eval_file": "null",
            "data.max_seq_len": "96",
            "training.method": method,
            "training.device": "cpu",
            "training.num_threads": "1",
            "training.batch_size": "2",
            "training.max_steps": "4",
            "training.learning_rate": "2e-3",
            "training.warmup_ratio": "0",
            "training.gradient_checkpointing": "false",
            "training.logging_steps": "1",
            "training.save_steps": "100",
            "training.report_to": "[]",
            "alignment.reward_functions": BREVITY,
            "alignment.max_new_tokens": "12",
            "alignment.num_generations": "4",
            "output.dir": str(folder / "run"),
            **overrides,
        },
    )


def test_gradient_checkpointing_changes_no_step_and_survives_sampling(eos_model_dir, tmp_path):
    runs = []
    for checkpointing in (False, True):
        overrides = {"training.max_steps": 2, "training.gradient_checkpointing": checkpointing, "data.eval_file": None}
        trainer = make_trainer(rl_config(eos_model_dir, tmp_path / str(checkpointing), "grpo", **overrides), log=_quiet)
        trainer.train()
        assert trainer.model.is_gradient_checkpointing == checkpointing and trainer.model.training
        runs.append([h[key] for h in trainer.history for key in ("loss", "reward", "kl")])
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)
