import pytest
import torch

from qlora_platform.data.tokenize import IGNORE
from qlora_platform.train.batching import collate, plan_epoch


def _ex(n, start=1):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}


def test_plan_is_deterministic_per_epoch_and_covers_everything():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    a, b = plan_epoch(lengths, 0, 42, 2, 16, packing=False), plan_epoch(lengths, 0, 42, 2, 16, packing=False)
    assert a == b and a != plan_epoch(lengths, 1, 42, 2, 16, packing=False)
    assert sorted(i for batch in a for row in batch for i in row) == list(range(8))
    packed = plan_epoch(lengths, 0, 42, 2, 16, packing=True)
    assert sorted(i for batch in packed for row in batch for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 16 for batch in packed for row in batch)


def test_padded_collate():
    batch = collate([[_ex(3)], [_ex(5)]], pad_id=0, packing=False)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist()[3:] == [IGNORE, IGNORE]
    assert batch["num_tokens"] == 8


def test_packed_collate_restarts_positions_and_masks_the_seam():
    batch = collate([[_ex(3), _ex(2, start=10)]], pad_id=0, packing=True)
    assert "attention_mask" not in batch  # transformers builds it from the positions
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert batch["labels"][0, 3].item() == IGNORE  # no prediction across the seam


def test_packed_logits_equal_separate_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, b, c = _ex(6, start=100), _ex(4, start=300), _ex(5, start=500)
    with torch.no_grad():
        packed = collate([[a, b], [c]], 0, packing=True)  # the second row is padded
        # As the trainer calls it: no mask and no cache, so the positions mark the boundaries.
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([ex["input_ids"]])).logits[0] for ex in (a, b, c)]
    assert torch.allclose(out[0, :6], alone[0], atol=1e-4)
    assert torch.allclose(out[0, 6:], alone[1], atol=1e-4)
    assert torch.allclose(out[1, :5], alone[2], atol=1e-4)
    assert torch.isfinite(out).all()  # padding positions too


def test_packed_rows_are_always_max_seq_len_wide_with_the_tail_kept_out_of_the_loss():
    rows = [[_ex(5), _ex(3, start=20)], [_ex(4, start=40)]]
    batch = collate(rows, pad_id=0, packing=True, max_seq_len=12)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 12)
    assert batch["labels"][0, 8:].eq(IGNORE).all() and batch["labels"][1, 4:].eq(IGNORE).all()
    assert batch["input_ids"][0, 8:].eq(0).all()
    # The tail is a sequence of its own: positions restart, boundaries mark it.
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3] + list(range(8))
    cu = batch["cu_seq_lens"]
    assert cu.dtype == torch.int32
    assert cu.tolist()[:6] == [0, 5, 8, 12, 16, 24] and set(cu.tolist()[6:]) == {24}
    assert batch["num_tokens"] == 12 and "attention_mask" not in batch
    # Another batch of the same run: the same shapes (one CUDA graph serves both).
    other = collate([[_ex(2)], [_ex(7), _ex(2, start=9)]], 0, True, max_seq_len=12)
    assert {k: tuple(v.shape) for k, v in other.items() if torch.is_tensor(v)} == {
        k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)
    }


def test_a_full_row_gets_no_tail_and_slots_round_to_a_power_of_two():
    from qlora_platform.train.batching import segment_slots

    batch = collate([[_ex(6), _ex(6, start=30)]], 0, True, max_seq_len=12)
    assert batch["cu_seq_lens"].tolist()[:3] == [0, 6, 12] and batch["position_ids"][0, 6].item() == 0
    assert segment_slots(3, 2, 1024) == 32 and segment_slots(33, 2, 1024) == 64 and segment_slots(1, 1, 8) == 1


def test_padded_batches_are_bucketed_to_a_few_widths():
    from qlora_platform.train.batching import padded_width

    assert [padded_width(n, 1024) for n in (1, 128, 129, 300, 1000, 1024)] == [128, 128, 256, 384, 1024, 1024]
    assert padded_width(90, 96) == 96 and padded_width(100, None) == 100
    batch = collate([[_ex(3)], [_ex(130)]], pad_id=0, packing=False, max_seq_len=1024)
    assert batch["input_ids"].shape == (2, 256)
    assert batch["attention_mask"][0].sum() == 3 and batch["labels"][0, 3:].eq(IGNORE).all()
    assert batch["position_ids"][0].tolist() == list(range(256))  # pads continue the row
    assert batch["num_tokens"] == 133 and "cu_seq_lens" not in batch


def test_packing_fills_rows_first_fit_and_keeps_every_example_once():
    lengths = [700, 500, 300, 200, 600, 100, 400, 250, 900, 50] * 3
    plan = plan_epoch(lengths, 0, 7, 2, 1024, packing=True)
    rows = [row for batch in plan for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 1024) + 3  # within a few rows of perfect


def test_loss_per_real_token_does_not_depend_on_the_width(tiny_model_dir):
    """Bucketed padding (no mask: causal attention) and full-width packed rows give the same
    summed loss as the tightest layout."""
    from transformers import AutoModelForCausalLM

    from qlora_platform.eval.perplexity import summed_answer_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, b, c = _ex(6, start=100), _ex(4, start=300), _ex(9, start=500)
    with torch.no_grad():

        def loss(batch, **extra):
            logits = model(input_ids=batch["input_ids"], use_cache=False, **extra).logits
            return summed_answer_nll(logits, batch["labels"]).item()

        tight = collate([[a], [c]], 0, packing=False)
        wide = collate([[a], [c]], 0, packing=False, max_seq_len=64)
        assert wide["input_ids"].shape[1] == 64
        assert loss(wide) == pytest.approx(loss(tight, attention_mask=tight["attention_mask"]), rel=1e-5)
        tight = collate([[a, b], [c]], 0, packing=True)
        wide = collate([[a, b], [c]], 0, packing=True, max_seq_len=48)
        assert loss(wide, position_ids=wide["position_ids"]) == pytest.approx(
            loss(tight, position_ids=tight["position_ids"]), rel=1e-5
        )
