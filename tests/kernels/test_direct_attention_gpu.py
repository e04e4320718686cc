"""cuDNN's attention called by the fast layer itself (kernels/decoder_layer.py), on a GPU: under
offloaded checkpointing the first pass keeps its output and log-sum-exp and the recompute calls
its backward directly; the gradients are those of the fast model without checkpointing. Run on
the device machine: pytest -m gpu tests/kernels."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def _model(offload: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_platform.kernels import apply_fast_kernels
    from qlora_platform.kernels.offload import Offloader, use_offloader

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 64: a size the direct call takes
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    assert apply_fast_kernels(model).decoder_layers == 2
    model.enable_input_require_grads()
    if offload:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        use_offloader(model, Offloader(torch.device("cuda")))
    return model.train()


def _grads(model, ids):
    for _ in range(2):  # the second step reuses the pooled host buffers
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not HOPPER, reason="SDPA picks cuDNN's attention on Hopper")
def test_the_first_pass_calls_cudnn_attention_and_the_recompute_its_backward(monkeypatch):
    from qlora_platform.kernels import decoder_layer, lora

    decoder_layer.cudnn_attention_available.cache_clear()
    lora.addmm_out_dtype_available.cache_clear()
    calls = []
    real = decoder_layer._direct_attention
    monkeypatch.setattr(decoder_layer, "_direct_attention", lambda *a: calls.append(real(*a)) or calls[-1])
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2)).cuda()
    loss_plain, plain = _grads(_model(offload=False), ids)
    assert calls == []  # without the checkpoint nothing is kept: the model's attention function
    loss_off, off = _grads(_model(offload=True), ids)
    device = torch.device("cuda", torch.cuda.current_device())
    assert decoder_layer.cudnn_attention_available(device, torch.bfloat16, 64)
    assert len(calls) == 2 * 2 and all(a is not None for a in calls)  # both layers, both steps
    assert loss_off == pytest.approx(loss_plain, rel=1e-3)
    for name, g in plain.items():
        torch.testing.assert_close(off[name], g, atol=1e-3, rtol=2e-2)
