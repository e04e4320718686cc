"""What steers the fast path is explicit: capability probes are cached functions of the device
and the build with a reset, and a checkpointed layer's replay belongs to its model's Offloader.
(The padded buffers: test_triton_kernels.py; two models side by side: test_decoder_layer.py.)"""

import pytest
import torch

from qlora_platform.kernels import decoder_layer, lora
from qlora_platform.kernels.offload import LayerReplay, Offloader, layer_offloader, replay_of

CPU = torch.device("cpu")


@pytest.fixture
def fresh_probes():
    lora.addmm_out_dtype_available.cache_clear()
    decoder_layer.cudnn_attention_available.cache_clear()
    yield
    lora.addmm_out_dtype_available.cache_clear()
    decoder_layer.cudnn_attention_available.cache_clear()


def test_the_addmm_probe_runs_once_per_device_and_dtypes_until_reset(fresh_probes, monkeypatch):
    calls = []

    def refusing_addmm(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        raise RuntimeError("no addmm.dtype here")

    monkeypatch.setattr(torch, "addmm", refusing_addmm)
    assert not lora.addmm_out_dtype_available(CPU, torch.bfloat16, torch.float32)
    assert not lora.addmm_out_dtype_available(CPU, torch.bfloat16, torch.float32)
    assert calls == [torch.float32]  # cached
    assert not lora.addmm_out_dtype_available(CPU, torch.float16, torch.float32)
    assert len(calls) == 2  # another dtype is another question

    monkeypatch.setattr(torch, "addmm", lambda *args, **kwargs: calls.append("ok"))
    assert not lora.addmm_out_dtype_available(CPU, torch.bfloat16, torch.float32)  # still the cached answer
    lora.addmm_out_dtype_available.cache_clear()
    assert lora.addmm_out_dtype_available(CPU, torch.bfloat16, torch.float32)
    assert calls[-1] == "ok"


def test_scaled_mm_asks_the_probe_on_cuda_only(fresh_probes):
    m1, m2 = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, 3, dtype=torch.bfloat16)
    out = lora._scaled_mm(m1, m2, 0.5, torch.float32)
    torch.testing.assert_close(out, (0.5 * m1 @ m2), atol=0, rtol=0)
    assert lora.addmm_out_dtype_available.cache_info().currsize == 0


def test_the_cudnn_attention_probe_says_no_off_cuda_and_is_cached(fresh_probes):
    probe = decoder_layer.cudnn_attention_available
    assert not probe(CPU, torch.bfloat16, 64)  # no CPU kernel: refused, not raised
    assert not probe(CPU, torch.bfloat16, 64)
    assert probe.cache_info().hits == 1 and probe.cache_info().misses == 1
    probe.cache_clear()
    assert probe.cache_info().currsize == 0


def test_an_offloaders_replay_is_its_own_and_restored_after_the_block():
    one, two = Offloader(CPU), Offloader(CPU)
    outer, inner = LayerReplay(one, 0), LayerReplay(kept={})
    with one.replaying(outer):
        assert one.replay is outer and two.replay is None
        with one.replaying(inner):
            assert one.replay is inner
        assert one.replay is outer
    assert one.replay is None


def test_reset_forgets_a_replay_left_by_a_pass_that_did_not_finish():
    offloader = Offloader(CPU)
    offloader.replay = LayerReplay(offloader, 0)
    offloader.reset()
    assert offloader.replay is None


def test_a_layer_finds_the_replay_through_its_own_checkpoint_function():
    import functools

    from qlora_platform.kernels.offload import offloaded_checkpoint

    offloader = Offloader(CPU)
    layer, plain, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, offloader)
    other._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, Offloader(CPU))
    replay = LayerReplay(offloader, 0)
    with offloader.replaying(replay):
        assert layer_offloader(layer) is offloader and replay_of(layer) is replay
        assert replay_of(plain) is None and replay_of(other) is None


def test_a_recompute_replay_cannot_keep():
    with pytest.raises(RuntimeError, match="only a first pass keeps"):
        LayerReplay(kept={}).keep("x", torch.zeros(1))
