"""train/cuda_graph.py: forward + backward replayed from a CUDA graph equals the eager step.

The graph tests need a GPU (pytest -m gpu on the device machine); on the CPU the same
object runs eagerly, which the first test checks.
"""

import pytest
import torch

from qlora_platform.train.cuda_graph import LossBackward

no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_on_the_cpu_it_is_the_eager_step_with_the_loss_scaled():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    run = LossBackward(lambda x: (w * x).sum(), "cpu")
    x = torch.tensor([3.0, 4.0])
    loss = run({"x": x}, scale=0.5)
    run({"x": x}, scale=0.5)
    assert not run.enabled and not run.graphs
    assert loss.item() == pytest.approx(0.5 * (6.0 - 4.0))
    torch.testing.assert_close(w.grad, 2 * 0.5 * x)  # accumulated over both calls


def _packed_batch(g):
    """Packed rows of examples of random lengths: new boundaries, the same shapes every time."""
    from qlora_platform.train.batching import collate

    def ex():
        n = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(1, 1000, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [-100] + ids[1:]}

    batch = collate([[ex(), ex()], [ex(), ex(), ex()]], 0, packing=True, max_seq_len=96)
    return {k: batch[k].cuda() for k in ("labels", "input_ids", "position_ids", "cu_seq_lens")}


def _train(cfg, graphs: bool, steps: int = 5, packed: bool = False):
    """A few optimizer steps of the fast path on the GPU; per-step losses and the final adapter."""
    from qlora_platform.train.flat_params import FlatParams
    from qlora_platform.train.model import build_training_model, loss_backward

    torch.manual_seed(0)
    model, fused = build_training_model(cfg, "cuda", log=lambda *_: None)
    flat = FlatParams([p for p in model.parameters() if p.requires_grad])
    opt = torch.optim.AdamW([flat.param], lr=1e-2)
    messages = []
    run = loss_backward(model, fused, cfg, "cuda", log=messages.append)
    run.enabled = graphs
    g = torch.Generator().manual_seed(3)
    # Two random batches in turn: the static buffers take new data every step, and the loss on
    # one batch can be compared with its own earlier loss (a fresh random batch each step moves
    # the loss more than five steps of learning do).
    pair = [torch.randint(0, 1000, (2, 64), generator=g).cuda() for _ in range(2)]
    losses = []
    for step in range(steps):
        if packed:
            losses.append(run(_packed_batch(g), scale=1 / 100).item())
        else:
            ids = pair[step % 2]
            losses.append(run({"labels": ids, "input_ids": ids}, scale=1 / 126).item())
        opt.step()
        flat.zero_grad()
    return losses, flat.param.detach().clone(), run, messages


@pytest.mark.gpu
@no_gpu
@pytest.mark.parametrize("offload", [True, False])
def test_graph_replay_trains_exactly_as_the_eager_step(tiny_cfg, offload):
    tiny_cfg.training.device = "cuda"
    tiny_cfg.quantization.compute_dtype = "bfloat16"
    tiny_cfg.training.gradient_checkpointing = True
    tiny_cfg.training.offload_checkpoints = offload
    eager_losses, eager_params, _, _ = _train(tiny_cfg, graphs=False)
    graph_losses, graph_params, run, messages = _train(tiny_cfg, graphs=True)
    assert len(run.graphs) == 1 and all(g is not None for g in run.graphs.values()), messages
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    torch.testing.assert_close(graph_params, eager_params, atol=1e-5, rtol=1e-4)
    assert graph_losses[4] < graph_losses[2] < graph_losses[0]  # the same batch, learnt


@pytest.mark.gpu
@no_gpu
@pytest.mark.parametrize("offload", [True, False])
def test_packed_batches_replay_from_one_graph_as_the_eager_step(tiny_cfg, offload):
    """Variable-length attention with boundaries as a tensor: one graph serves every packing."""
    tiny_cfg.training.device = "cuda"
    tiny_cfg.quantization.compute_dtype = "bfloat16"
    tiny_cfg.training.gradient_checkpointing = True
    tiny_cfg.training.offload_checkpoints = offload
    eager_losses, eager_params, _, _ = _train(tiny_cfg, graphs=False, steps=6, packed=True)
    graph_losses, graph_params, run, messages = _train(tiny_cfg, graphs=True, steps=6, packed=True)
    assert len(run.graphs) == 1 and all(g is not None for g in run.graphs.values()), messages
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    torch.testing.assert_close(graph_params, eager_params, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@no_gpu
def test_a_step_that_cannot_be_captured_stays_eager_and_says_so():
    w = torch.nn.Parameter(torch.ones(4, device="cuda"))
    w.grad = torch.zeros_like(w)

    def syncing_loss(x):
        loss = (w * x).sum()
        if loss.item() > 1e9:  # waits on the GPU: not capturable
            raise AssertionError
        return loss

    messages = []
    run = LossBackward(syncing_loss, "cuda", log=messages.append)
    x = torch.arange(4.0, device="cuda")
    for _ in range(3):
        loss = run({"x": x}, scale=1.0)
    assert loss.item() == pytest.approx(6.0)
    torch.testing.assert_close(w.grad, 3 * x)
    assert list(run.graphs.values()) == [None]
    assert len(messages) == 1 and "could not be captured" in messages[0]
    assert torch.randn(3, device="cuda").isfinite().all()  # random draws still work
