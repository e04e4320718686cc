"""The one place where the platform swaps its fast kernels into a Hugging Face model.

    report = apply_fast_kernels(peft_model)       # after models.loader.attach_lora

Monkeypatching lives here and nowhere else. It replaces the `forward` of single
module instances (never of classes, so other models in the process are untouched):
- PEFT LoRA layers on 4-bit or 16-bit linears -> `lora.lora_linear`;
- q, k and v of one attention block -> one `lora.lora_projections` call, made when q_proj
  runs (the model's attention code calls q_proj, k_proj, v_proj on the same tensor, in
  that order; k_proj and v_proj then hand out their share), so the input gradient of the
  three accumulates in one buffer and the attention code itself stays the model's own;
- SwiGLU MLPs (gate/up/down all LoRA layers, SiLU) -> `lora.lora_swiglu_mlp`;
- Llama-form RMSNorms with a frozen 16-bit weight -> `rmsnorm.rms_norm`;
- Llama/Mistral/Qwen2 decoder layers whose seven projections all take the fast path ->
  `decoder_layer.decoder_layer_forward` (fused RoPE; a checkpoint recompute that redoes
  only attention and the gate/up products). The module patches above serve its fallbacks.
Every patched forward checks at call time that the fast path still applies
(adapter enabled, not merged, the same single adapter, no extra arguments) and
otherwise runs the module's own forward, so `disable_adapter()`, merging and
PEFT's other features keep working. A layer the kernels cannot express exactly
(LoRA dropout, DoRA, several adapters, 8-bit base) stays on PEFT, and the report
says why.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from .decoder_layer import ATTENTION_CLASSES, decoder_layer_forward
from .fp8 import Fp8Plan
from .lora import LoRAProj, cast_adapters, compute_dtype, lora_linear, lora_projections, lora_swiglu_mlp
from .rmsnorm import RMSNORM_CLASSES, rms_norm

SILU_CLASSES = {"SiLU", "SiLUActivation"}


@dataclass
class FastKernelReport:
    lora_linear: int = 0
    fused_qkv: int = 0
    swiglu_mlp: int = 0
    rms_norm: int = 0
    decoder_layers: int = 0
    fp8: Fp8Plan | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        text = (
            f"fast kernels: {self.lora_linear} LoRA linears, {self.fused_qkv} fused QKV, "
            f"{self.swiglu_mlp} SwiGLU MLPs, {self.rms_norm} RMSNorms, {self.decoder_layers} decoder layers"
        )
        if self.fp8 is not None:
            which = (
                " and ".join(
                    part for part, on in (("forward", self.fp8.forward), ("input-gradient", self.fp8.input_grad)) if on
                )
                or "no"
            )
            text += f"; {which} base products in fp8 from {self.fp8.min_tokens} tokens a batch"
        if self.skipped:
            text += "; left on PEFT/stock: " + ", ".join(f"{n} ({why})" for why, n in self.skipped.items())
        return text


def _is_lora_layer(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, LoraLayer)


def _unsupported(layer) -> str | None:
    """Why this PEFT LoRA layer cannot take the fused path (None when it can)."""
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        return "not exactly one LoRA adapter"
    name = adapters[0]
    base = layer.get_base_layer()
    quantized = getattr(base.weight, "quant_state", None) is not None or type(base).__name__ == "Linear4bit"
    if not quantized and type(base) is not nn.Linear:
        return f"base layer {type(base).__name__}"
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return "lora.dropout > 0 (set it to 0 for the fused path)"
    if layer.use_dora.get(name, False):
        return "DoRA"
    if getattr(layer, "fan_in_fan_out", False) or layer.lora_B[name].bias is not None:
        return "fan_in_fan_out or LoRA bias"
    return None


def _still_fast(layer) -> bool:
    """The call-time check: the adapter the layer was patched for is the one active."""
    return not layer.disable_adapters and not layer.merged and list(layer.active_adapters) == list(layer.lora_A.keys())


def _proj(layer, fp8) -> LoRAProj:
    # Built per call: the adapter tensors may be replaced (resume, load_adapter) after patching.
    return LoRAProj.of(layer, list(layer.lora_A.keys())[0], fp8)


def _fast_lora_forward(layer, fp8, x, *args, **kwargs):
    if args or kwargs or not _still_fast(layer):
        return type(layer).forward(layer, x, *args, **kwargs)
    y = lora_linear(x, _proj(layer, fp8))
    return y.to(x.dtype)  # a no-op when the dtypes agree


class _SharedQKV:
    """The three LoRA layers of one attention block and the outputs k_proj and v_proj are owed."""

    def __init__(self, layers):
        self.layers = layers
        self.x, self.owed = None, [None, None, None]


def _fast_qkv_forward(shared: _SharedQKV, index: int, fp8, x, *args, **kwargs):
    layer = shared.layers[index]
    if args or kwargs or not all(_still_fast(one) for one in shared.layers):
        return type(layer).forward(layer, x, *args, **kwargs)
    if index == 0:
        outs = [o.to(x.dtype) for o in lora_projections(x, [_proj(one, fp8) for one in shared.layers])]
        shared.x, shared.owed = x, [None, outs[1], outs[2]]
        return outs[0]
    if shared.x is x and shared.owed[index] is not None:
        out, shared.owed[index] = shared.owed[index], None
        if shared.owed == [None, None, None]:
            shared.x = None
        return out
    y = lora_linear(x, _proj(layer, fp8))  # called on its own
    return y.to(x.dtype)


def _fast_mlp_forward(mlp, fp8, x):
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(_still_fast(layer) for layer in layers):
        return type(mlp).forward(mlp, x)
    y = lora_swiglu_mlp(x, *(_proj(layer, fp8) for layer in layers))
    return y.to(x.dtype)


LAYER_PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def _layer_projections(layer) -> dict:
    return {name: getattr(getattr(layer, parent), name) for name, parent in LAYER_PROJECTIONS.items()}


def _fast_layer_forward(layer, fp8, hidden_states, *args, **kwargs):
    lora_layers = _layer_projections(layer)
    if (
        args
        or kwargs.get("past_key_values") is not None
        or kwargs.get("position_embeddings") is None
        or not all(_still_fast(one) for one in lora_layers.values())
    ):
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    projs = {name: _proj(one, fp8) for name, one in lora_layers.items()}
    cast_adapters(list(projs.values()), compute_dtype(projs["q_proj"]))
    return decoder_layer_forward(layer, projs, hidden_states, **kwargs)


def _fast_decoder_layer(module) -> bool:
    attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    return (
        attn is not None
        and type(attn).__name__ in ATTENTION_CLASSES
        and hasattr(module, "input_layernorm")
        and hasattr(module, "post_attention_layernorm")
        and _qkv_block(attn)
        and _swiglu_mlp(mlp)
        and _is_lora_layer(attn.o_proj)
        and _unsupported(attn.o_proj) is None
    )


def _fast_rms_forward(norm, x):
    return rms_norm(x, norm.weight, norm.variance_epsilon)


def _qkv_block(module) -> bool:
    parts = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    return all(p is not None and _is_lora_layer(p) and _unsupported(p) is None for p in parts)


def _swiglu_mlp(module) -> bool:
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    return (
        all(p is not None and _is_lora_layer(p) and _unsupported(p) is None for p in parts)
        and type(act).__name__ in SILU_CLASSES
    )


def apply_fast_kernels(model, fp8: Fp8Plan | None = None) -> FastKernelReport:
    """Patch every module of `model` the kernels support; returns what was done and skipped.
    With an `Fp8Plan`, base-weight products of large enough batches run in fp8
    (kernels/fp8.py) on GPUs that have it."""
    report = FastKernelReport(fp8=fp8)
    fused: set[int] = set()  # layers already taken by a fused MLP or QKV
    for module in model.modules():
        if _fast_decoder_layer(module):
            module.forward = functools.partial(_fast_layer_forward, module, fp8)
            report.decoder_layers += 1
        if _swiglu_mlp(module):
            module.forward = functools.partial(_fast_mlp_forward, module, fp8)
            fused.update(id(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj"))
            report.swiglu_mlp += 1
        elif _qkv_block(module):
            shared = _SharedQKV([module.q_proj, module.k_proj, module.v_proj])
            for index, layer in enumerate(shared.layers):
                layer.forward = functools.partial(_fast_qkv_forward, shared, index, fp8)
                fused.add(id(layer))
            report.fused_qkv += 1
    for module in model.modules():
        if _is_lora_layer(module) and id(module) not in fused and hasattr(module, "get_base_layer"):
            reason = _unsupported(module)
            if reason:
                report.skip(reason)
                continue
            module.forward = functools.partial(_fast_lora_forward, module, fp8)
            report.lora_linear += 1
        elif type(module).__name__ in RMSNORM_CLASSES:
            weight = getattr(module, "weight", None)
            if weight is None or not hasattr(module, "variance_epsilon"):
                report.skip(f"{type(module).__name__} without weight/eps")
            elif weight.requires_grad or weight.dtype == torch.float32:
                report.skip("trainable or fp32 norm")
            else:
                module.forward = functools.partial(_fast_rms_forward, module)
                report.rms_norm += 1
    return report
