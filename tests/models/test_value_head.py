"""The scalar head shared by the reward model and PPO's value: shapes, dtype, the last token, files."""

from __future__ import annotations

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.models.value_head import HEAD_FILE, ScalarHead, last_token_hidden, load_head, save_head


def test_the_head_is_float32_and_squeezes_the_last_dim():
    torch.manual_seed(0)
    head = ScalarHead(8)
    assert head.linear.weight.dtype == torch.float32 and head.linear.weight.shape == (1, 8)
    hidden = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    out = head(hidden)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    expected = hidden.float() @ head.linear.weight[0] + head.linear.bias
    assert torch.allclose(out, expected, atol=1e-6)


def test_last_token_hidden_reads_each_rows_last_attended_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = last_token_hidden(hidden, mask)
    assert torch.equal(out, torch.stack([hidden[0, 2], hidden[1, 3]]))
    one = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]])
    assert torch.equal(last_token_hidden(hidden, one), torch.stack([hidden[0, 0], hidden[1, 1]]))


def test_a_saved_head_loads_back_equal(tmp_path):
    torch.manual_seed(1)
    head = ScalarHead(16)
    with torch.no_grad():
        head.linear.bias.fill_(0.25)
    save_head(head, tmp_path)
    assert (tmp_path / HEAD_FILE).is_file()
    back = load_head(tmp_path, 16)
    x = torch.randn(4, 16)
    assert torch.equal(back(x), head(x))


def test_a_missing_or_misfitting_head_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no scalar_head.safetensors") as err:
        load_head(tmp_path, 16)
    assert "\n" not in str(err.value)
    save_head(ScalarHead(16), tmp_path)
    with pytest.raises(UserError, match="hidden size 16, this base has 32") as err:
        load_head(tmp_path, 32)
    assert "\n" not in str(err.value)
