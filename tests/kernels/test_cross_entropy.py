"""The logits-free loss against cross-entropy over full logits: value and gradient."""

import pytest
import torch

from qlora_platform.eval.perplexity import summed_answer_nll
from qlora_platform.kernels.cross_entropy import IGNORE, linear_cross_entropy, shift_labels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [7, 1000])  # several chunks, and one
def test_matches_full_logits_loss_and_gradient(dtype, tol, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 32, generator=g).to(dtype)
    head = (0.3 * torch.randn(50, 32, generator=g)).to(dtype)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = IGNORE  # a prompt: not scored
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()

    loss = linear_cross_entropy(h1, head, shift_labels(labels), chunk=chunk)
    ref = summed_answer_nll(h2 @ head.t(), labels)
    torch.testing.assert_close(loss, ref, atol=tol * 10, rtol=tol)
    (loss / 5).backward()
    (ref / 5).backward()
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=tol, rtol=tol)


def test_all_ignored_gives_zero_loss_and_gradient():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), torch.full((2, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max().item() == 0


def test_shift_labels_moves_left_and_ignores_the_last_position():
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, IGNORE]]


def test_a_trainable_head_falls_back_to_full_logits():
    head = torch.randn(10, 8, requires_grad=True)
    labels = torch.randint(0, 10, (1, 5))
    loss = linear_cross_entropy(torch.randn(1, 5, 8), head, labels)
    loss.backward()
    assert head.grad is not None
    assert torch.isfinite(loss)
