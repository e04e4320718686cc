"""The reward model on the tiny random Llama: the loss, learning, the head in checkpoints and resume,
RewardModel.attach on a policy's base, and the one-line errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from qlora_platform.config import load_config
from qlora_platform.errors import UserError
from qlora_platform.models.reward_model import REWARD_ADAPTER, RewardModel
from qlora_platform.models.value_head import HEAD_FILE, load_head
from qlora_platform.train.checkpoint import list_checkpoints
from qlora_platform.train.methods import make_trainer
from qlora_platform.train.model import build_training_model
from qlora_platform.train.reward import RewardTrainer, reward_loss, reward_metrics
from tests.conftest import assert_same_lora, interrupt_during, tiny_run_config, write_jsonl
from tests.train.test_dpo import pair, toy_pairs


def _quiet(*_args, **_kwargs) -> None:
    pass


def reward_cfg(model_dir: Path, folder: Path, out: Path):
    train, held = toy_pairs(folder)
    return tiny_run_config(model_dir, train, held, out, **{"training.method": "reward", "training.learning_rate": 1e-2})


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tmp_path_factory):
    """One uninterrupted 6-step reward run, with its training pairs scored before training."""
    root = tmp_path_factory.mktemp("reward")
    trainer = make_trainer(reward_cfg(tiny_model_dir, root, root / "run"), log=_quiet)
    before = trainer.score_pairs(trainer.train_examples)
    trainer.train()
    return trainer, before


def test_the_reward_loss_equals_the_hand_computed_value():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    # pair 0: margin 1 -> log(1 + e^-1); pair 1: margin -1 -> log(1 + e^1)
    expected = torch.tensor([math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))])
    assert torch.allclose(reward_loss(chosen, rejected), expected, atol=1e-6)
    stats = reward_metrics(chosen, rejected)
    assert stats["reward_accuracy"] == 0.5 and stats["margin"] == pytest.approx(0.0)
    assert stats["loss"] == pytest.approx(float(expected.mean()))


def test_reward_steps_raise_the_reward_accuracy_on_the_training_pairs(reward_run):
    trainer, before = reward_run
    assert isinstance(trainer, RewardTrainer)
    after = trainer.score_pairs(trainer.train_examples)
    acc = [float(((r[:, 0] - r[:, 1]) > 0).float().mean()) for r in (before, after)]
    margin = [float((r[:, 0] - r[:, 1]).mean()) for r in (before, after)]
    assert acc[1] > acc[0] and acc[1] >= 0.9 and margin[1] > margin[0] + 1.0
    steps = [h for h in trainer.history if "reward_accuracy" in h]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["margin"] > steps[0]["margin"]
    summary = json.loads((trainer.out / "train_summary.json").read_text())
    assert summary["method"] == "reward" and summary["eval_reward_accuracy"] >= 0.75
    assert summary["eval_perplexity"] is None


def test_the_head_trains_and_is_saved_in_every_checkpoint_and_the_final_adapter(reward_run):
    trainer, _ = reward_run
    head_params = {id(p) for p in trainer.head.parameters()}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert head_params <= in_optimizer
    folders = [path for _, path in list_checkpoints(trainer.out)] + [trainer.out / "final_adapter"]
    assert [p.name for p in folders] == ["checkpoint-3", "checkpoint-6", "final_adapter"]
    for folder in folders:
        assert (folder / HEAD_FILE).is_file()
    saved = load_head(trainer.out / "final_adapter", trainer.hidden_size)
    first = load_head(trainer.out / "checkpoint-3", trainer.hidden_size)
    x = torch.randn(3, trainer.hidden_size)
    assert torch.allclose(saved(x), trainer.head(x).cpu()) and not torch.allclose(first(x), saved(x))


def test_an_interrupted_reward_run_resumes_to_the_same_adapter_and_head(reward_run, tiny_model_dir, tmp_path):
    full, _ = reward_run
    cfg = reward_cfg(tiny_model_dir, tmp_path, tmp_path / "run")
    interrupted = interrupt_during(make_trainer(cfg, log=_quiet), call=5)
    with pytest.raises(UserError, match="interrupted at step 4/6.*--resume"):
        interrupted.train()
    assert [s for s, _ in list_checkpoints(cfg.output.dir)] == [3, 4]
    resumed = make_trainer(cfg, resume=True, log=_quiet)
    assert isinstance(resumed, RewardTrainer) and resumed.step == 4
    resumed.train()
    assert resumed.step == 6
    assert_same_lora(resumed.model, full.model)
    for p, q in zip(resumed.head.parameters(), full.head.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.fixture(scope="module")
def policy(reward_run, tiny_model_dir, tmp_path_factory):
    """A fresh policy (the tiny base with a trainable adapter), as PPO builds it."""
    root = tmp_path_factory.mktemp("policy")
    train, held = toy_pairs(root)
    cfg = tiny_run_config(tiny_model_dir, train, held, root / "run")
    model, _ = build_training_model(cfg, "cpu", log=_quiet)
    return model


def test_the_reward_model_scores_on_the_policys_base_and_leaves_the_policy_as_it_was(reward_run, policy):
    trainer, _ = reward_run
    rm = RewardModel.attach(policy, trainer.out / "final_adapter")
    assert policy.active_adapter == "default" and REWARD_ADAPTER in policy.peft_config
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    assert any(flags[n] for n in flags if ".default." in n) and not any(flags[n] for n in flags if ".reward." in n)
    policy.train()
    pairs = trainer.train_examples[:4]
    rows = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
    rewards = rm.score_sequences(rows, trainer.tokenizer.pad_token_id, batch_size=8)
    # The same scores as the reward run's own model gives (one base, the reward adapter on).
    expected = trainer.score_pairs(pairs)
    assert torch.allclose(rewards, torch.cat([expected[:, 0], expected[:, 1]]), atol=1e-4)
    assert rewards.dtype == torch.float32 and not rewards.requires_grad
    assert policy.active_adapter == "default" and policy.training
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags


def test_attach_refuses_a_folder_that_is_not_a_reward_adapter(reward_run, policy, tmp_path):
    trainer, _ = reward_run
    plain = tmp_path / "plain_adapter"
    shutil.copytree(trainer.out / "final_adapter", plain)
    (plain / HEAD_FILE).unlink()  # an SFT or DPO adapter has no head
    for folder in (plain, tmp_path / "missing"):
        with pytest.raises(UserError, match="is not a reward model") as err:
            RewardModel.attach(policy, folder)
        assert "training.method reward" in str(err.value) and "\n" not in str(err.value)


def test_attach_refuses_a_reward_adapter_of_another_base(reward_run, policy, tmp_path):
    trainer, _ = reward_run
    other = tmp_path / "run" / "final_adapter"
    shutil.copytree(trainer.out / "final_adapter", other)
    config = (trainer.out / "config.yaml").read_text()
    (tmp_path / "run" / "config.yaml").write_text(config.replace(str(trainer.cfg.model.name), "Org/Other-Model"))
    adapter_cfg = json.loads((other / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = "Org/Other-Model"
    (other / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    with pytest.raises(UserError, match="trained on 'Org/Other-Model'") as err:
        RewardModel.attach(policy, other)
    assert "same model.name" in str(err.value) and "\n" not in str(err.value)

    shutil.copy(trainer.out / "final_adapter" / "adapter_config.json", other / "adapter_config.json")
    (tmp_path / "run" / "config.yaml").write_text(config)
    adapter_cfg = json.loads((other / "adapter_config.json").read_text())
    adapter_cfg["target_modules"] = ["q_proj", "wqkv"]
    (other / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    with pytest.raises(UserError, match="adapts wqkv, which this model does not have") as err:
        RewardModel.attach(policy, other)
    assert "\n" not in str(err.value)
    assert REWARD_ADAPTER not in policy.peft_config or policy.active_adapter == "default"


def test_an_unknown_method_is_one_line_naming_the_methods():
    with pytest.raises(UserError, match="training.method") as err:
        load_config(None, {"training.method": "rlhf"})
    assert all(m in str(err.value) for m in ("reward", "orpo", "kto")) and "\n" not in str(err.value)


def test_a_pair_without_rejected_is_one_line(tiny_model_dir, tmp_path):
    cfg = reward_cfg(tiny_model_dir, tmp_path, tmp_path / "run")
    bad = [pair("Say alpha.", "alpha alpha", "beta"), {"prompt": "Say beta.", "chosen": "beta beta"}]
    cfg.data.train_file = str(write_jsonl(tmp_path / "bad.jsonl", bad))
    with pytest.raises(UserError, match="bad.jsonl:2: the pair has 'chosen' but no 'rejected'") as err:
        make_trainer(cfg, log=_quiet)
    assert "\n" not in str(err.value)


def bundled_run(folder: Path, method: str, **settings) -> list[dict]:
    """`qlora train` of `method` on the bundled SmolLM2: 2 steps of 2 short pairs (16-bit on the CPU,
    which is several times faster there than the 4-bit path the tiny-model tests train); the step
    lines of its log."""
    from qlora_platform.cli import main

    sums = [(1, 2), (2, 3), (3, 4), (4, 5)]
    system = {"role": "system", "content": "Answer briefly."}  # shorter than the template's default
    pairs = [
        {
            "prompt": [system, {"role": "user", "content": f"What is {a} plus {b}?"}],
            "chosen": f"{a} plus {b} is {a + b}.",
            "rejected": "I do not know.",
        }
        for a, b in sums
    ]
    train = write_jsonl(folder / "pairs.jsonl", pairs)
    config = {
        "model": {"name": "bundled:smollm2-135m-instruct"},
        "quantization": {"load_in_4bit": False},
        "lora": {"dropout": 0.0},
        "data": {"train_file": str(train), "eval_file": None, "max_seq_len": 64, "packing": False},
        "training": {
            "method": method,
            "device": "cpu",
            "batch_size": 2,
            "max_steps": 2,
            "learning_rate": 1.0e-3,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "gradient_checkpointing": False,
            "logging_steps": 1,
            "save_steps": 100,
            "report_to": [],
        },
        "alignment": settings,
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    assert main(["train", "--config", str(path)]) == 0
    assert (folder / "run" / "final_adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (folder / "run" / "train_log.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


@pytest.mark.slow
def test_a_reward_model_of_the_bundled_model_learns_to_rank_the_pairs(tmp_path):
    first, last = bundled_run(tmp_path, "reward")
    # Step 1 scores its pairs with the untrained head; step 2 after one update.
    assert last["reward_accuracy"] > first["reward_accuracy"] and last["margin"] > first["margin"] + 1.0
    assert (tmp_path / "run" / "final_adapter" / HEAD_FILE).is_file()
