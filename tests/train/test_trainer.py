"""Real QLoRA steps (NF4 through bitsandbytes on the CPU) on a tiny random Llama."""

import json
from pathlib import Path

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.train.checkpoint import latest_checkpoint, list_checkpoints
from qlora_platform.train.trainer import Trainer
from tests.conftest import assert_same_lora, interrupt_during


def _split_params(model):
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return lora, base


def test_qlora_steps_learn_and_touch_only_lora(tiny_cfg):
    tiny_cfg.training.max_steps = 8
    tiny_cfg.training.report_to = ["tensorboard"]
    trainer = Trainer(tiny_cfg, log=lambda *_: None)
    assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    lora0, base0 = _split_params(trainer.model)
    summary = trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert all(map(lambda x: x == x and x < float("inf"), losses))
    assert losses[-1] < losses[0] * 0.9, losses
    lora1, base1 = _split_params(trainer.model)
    assert any(not torch.equal(lora0[n], lora1[n]) for n in lora0 if "lora_B" in n)
    assert all(torch.equal(base0[n], base1[n]) for n in base0)
    final = tiny_cfg.output.dir + "/final_adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
        "chat_template.jinja",
    ):
        assert (trainer.out / "final_adapter" / name).is_file(), name
    card = (trainer.out / "final_adapter" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card and "- qlora" in card
    assert summary["eval_perplexity"] > 1 and (trainer.out / "train_log.jsonl").is_file()
    assert list((trainer.out / "logs").iterdir()), "TensorBoard events"
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(final).r == 8


def test_evaluation_before_training_keeps_gradients(tiny_cfg):
    """bitsandbytes' CPU repacking trap: evaluate first, then gradients must still reach the input."""
    tiny_cfg.training.max_steps = 8
    trainer = Trainer(tiny_cfg, log=lambda *_: None)
    before = trainer.evaluate()
    trainer.model.train()
    for layer in (m for m in trainer.model.modules() if type(m).__name__ == "Linear4bit"):
        x = torch.randn(2, 3, layer.in_features, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, "no input gradient after evaluation"
    trainer.train()
    after = trainer.evaluate()
    assert after["loss"] < before["loss"]


def test_checkpoint_then_resume_continues_at_the_same_step_and_order(tiny_cfg, tmp_path):
    straight = tiny_cfg.model_copy(deep=True)
    straight.output.dir = str(tmp_path / "straight")
    full = Trainer(straight, log=lambda *_: None)
    full.train()

    interrupted = interrupt_during(Trainer(tiny_cfg, log=lambda *_: None), call=5)
    with pytest.raises(UserError, match="interrupted at step 4/6.*--resume") as err:
        interrupted.train()
    assert err.value.exit_code == 130
    assert [s for s, _ in list_checkpoints(tiny_cfg.output.dir)] == [3, 4]
    assert not list(interrupted.out.glob("*.tmp"))

    resumed = Trainer(tiny_cfg, resume=True, log=lambda *_: None)
    assert resumed.step == 4
    resumed.train()
    assert resumed.step == 6
    assert_same_lora(resumed.model, full.model)
    state = json.loads((latest_checkpoint(tiny_cfg.output.dir) / "trainer_state.json").read_text())
    assert state["global_step"] == 6  # the final step is checkpointed too
    state = json.loads((interrupted.out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_refuses_a_changed_data_order(tiny_cfg):
    Trainer(tiny_cfg, log=lambda *_: None).train()
    tiny_cfg.training.batch_size = 2
    with pytest.raises(UserError, match="training.batch_size was 4 .* but is 2 now"):
        Trainer(tiny_cfg, resume=True, log=lambda *_: None)


def test_packing_trains_too(tiny_cfg):
    tiny_cfg.data.packing = True
    tiny_cfg.training.max_steps = 4
    trainer = Trainer(tiny_cfg, log=lambda *_: None)
    trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[-1] < losses[0]


def test_the_final_evaluation_can_be_left_to_qlora_eval(tiny_cfg):
    tiny_cfg.training.max_steps = 2
    summary = Trainer(tiny_cfg, log=lambda *_: None, final_eval=False).train()
    assert summary["steps"] == 2 and summary["eval_perplexity"] is None
    run = Path(tiny_cfg.output.dir)
    assert (run / "final_adapter" / "adapter_model.safetensors").is_file()
    assert "eval_loss" not in (run / "train_log.jsonl").read_text()


def test_missing_data_file_is_clear(tiny_cfg):
    tiny_cfg.data.train_file = "/nonexistent/train.jsonl"
    with pytest.raises(UserError, match="train_file '/nonexistent/train.jsonl' does not exist.*qlora prepare"):
        Trainer(tiny_cfg)


def test_out_of_memory_saves_the_finished_steps_and_says_what_to_change(tiny_cfg):
    trainer = Trainer(tiny_cfg, log=lambda *_: None)
    real, calls = trainer._forward_backward, {"n": 0}

    def oom_in_step_3(rows, n):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(rows, n)

    trainer._forward_backward = oom_in_step_3
    with pytest.raises(UserError) as err:
        trainer.train()
    text = str(err.value)
    assert "out of memory in step 3/6" in text and "saved the 2 finished steps" in text
    assert "--batch_size 2 --grad_accum 2" in text and "--gradient_checkpointing true" in text
    assert "--resume" in text and "\n" not in text
    assert [s for s, _ in list_checkpoints(tiny_cfg.output.dir)] == [2]
    resumed = Trainer(tiny_cfg, resume=True, log=lambda *_: None)
    assert resumed.step == 2


def test_batches_without_padding_drop_the_mask_and_may_replay_from_a_cuda_graph(tiny_cfg):
    trainer = Trainer(tiny_cfg, log=lambda *_: None)
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(trainer.lengths):
        by_length.setdefault(n, []).append(i)
    same = next(ix for ix in by_length.values() if len(ix) >= 2)[:2]
    a, b = (ix[0] for ix in list(by_length.values())[:2])
    inputs, _, _, graphable = trainer._batch([[same[0]], [same[1]]])
    assert graphable and "attention_mask" not in inputs  # causal mask alone: capturable
    inputs, _, _, graphable = trainer._batch([[a], [b]])
    assert not graphable and inputs["attention_mask"].min() == 0  # padding: a mask, eager
    assert not trainer.run_batch.enabled  # CPU: always eager
