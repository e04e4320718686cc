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


def test_packed_collate_is_block_diagonal_and_masks_the_seam():
    batch = collate([[_ex(3), _ex(2, start=10)]], pad_id=0, packing=True)
    mask = batch["attention_mask"][0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert mask[4].tolist() == [False, False, False, True, True]  # 2nd example sees only itself
    assert mask[2].tolist() == [True, True, True, False, False]
    assert batch["labels"][0, 3].item() == IGNORE  # no prediction across the seam


def test_packed_logits_equal_separate_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, b = _ex(6, start=100), _ex(4, start=300)
    with torch.no_grad():
        packed = collate([[a, b]], 0, packing=True)
        out = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                    position_ids=packed["position_ids"]).logits
        la = model(input_ids=torch.tensor([a["input_ids"]])).logits
        lb = model(input_ids=torch.tensor([b["input_ids"]])).logits
    assert torch.allclose(out[0, :6], la[0], atol=1e-4)
    assert torch.allclose(out[0, 6:], lb[0], atol=1e-4)
