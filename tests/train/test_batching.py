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
    assert "attention_mask" not in batch          # transformers builds it from the positions
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert batch["labels"][0, 3].item() == IGNORE  # no prediction across the seam


def test_packed_logits_equal_separate_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, b, c = _ex(6, start=100), _ex(4, start=300), _ex(5, start=500)
    with torch.no_grad():
        packed = collate([[a, b], [c]], 0, packing=True)       # the second row is padded
        # As the trainer calls it: no mask and no cache, so the positions mark the boundaries.
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([ex["input_ids"]])).logits[0] for ex in (a, b, c)]
    assert torch.allclose(out[0, :6], alone[0], atol=1e-4)
    assert torch.allclose(out[0, 6:], alone[1], atol=1e-4)
    assert torch.allclose(out[1, :5], alone[2], atol=1e-4)
    assert torch.isfinite(out).all()                            # padding positions too
