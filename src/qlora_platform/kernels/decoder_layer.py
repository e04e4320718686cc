"""The Llama-family decoder layer (Llama, Mistral, Qwen2) for training, written out in full.

    out = decoder_layer_forward(layer, projs, hidden, attention_mask=m, position_ids=p,
                                position_embeddings=(cos, sin))

`patch.py` installs this as the `forward` of each decoder layer whose seven projections
are fast LoRA layers (`projs`: their `LoRAProj`s by name) and falls back to the stock
forward otherwise. Against the stock layer it buys two things:
- q, k and v come from one `lora_projections` call and RoPE is one in-place kernel
  (`rope.py`) instead of ten elementwise ones; attention itself is still the model's
  configured implementation (sdpa, flash, flex, eager) with the stock arguments;
- under the offloaded checkpointing of `offload.py` the recompute in backward does only
  what backward needs. Backward needs the inputs of the products (to form their input
  and LoRA gradients) and what attention and SwiGLU differentiate at, not the outputs of
  o_proj and down_proj, nor silu(gate) * up (the MLP rebuilds it). So the first pass
  also parks the rotated q, k, v and the residual after attention (`h2`) in host memory
  beside the layer input, and the recompute takes them from there: it skips the q/k/v,
  o_proj and down_proj products, RoPE and SwiGLU (the products run with output=False:
  only their rank-r LoRA halves, for the adapter gradients) and hands back a placeholder
  output that carries the gradient. What is left to recompute is the two norms,
  attention and the gate/up products: of the 7 weight products, 2 are recomputed.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from .lora import LoRAProj, lora_linear, lora_projections, lora_swiglu_mlp, placeholder
from .offload import current_replay
from .rope import rope_backward, rope_qk

# What the first pass keeps for the recompute, in this order.
KEPT_Q, KEPT_K, KEPT_V, KEPT_H2 = range(4)
KEPT_COUNT = 4

ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}

_PLAIN_CAUSAL = [False]


@contextlib.contextmanager
def plain_causal_attention():
    """For batches known to need only the causal mask (no padding, no packed sequences): attention
    ignores the mask the model built and runs causal. Under CUDA graph capture transformers
    cannot check that the mask is plain (it would wait on the GPU), so it builds a dense one,
    which moves SDPA off its fastest kernels; train/cuda_graph.py captures inside this."""
    _PLAIN_CAUSAL[0] = True
    try:
        yield
    finally:
        _PLAIN_CAUSAL[0] = False


class _KnownResidual(torch.autograd.Function):
    """h2 = x + o where the value of h2 is known (kept from the first pass) and o was not
    computed: returns the known value, passes the gradient to both summands."""

    @staticmethod
    def forward(ctx, x, o, known):
        return known[KEPT_H2]

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, None


class _KnownRotated(torch.autograd.Function):
    """q, k (rotated) and v where their values are known from the first pass and the
    projections ran with output=False: returns the known values; backward un-rotates the
    gradients of q and k and hands all three to the projections' placeholders."""

    @staticmethod
    def forward(ctx, q_placeholder, k_placeholder, v_placeholder, cos, sin, known):
        ctx.save_for_backward(cos, sin)
        return known[KEPT_Q], known[KEPT_K], known[KEPT_V]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        flat = [g.reshape(*g.shape[:2], -1) for g in (rope_backward(dq, cos, sin), rope_backward(dk, cos, sin), dv)]
        return (*flat, None, None, None)


class _Joined(torch.autograd.Function):
    """The layer output h2 + m when nobody reads its value (recompute): gradient to both."""

    @staticmethod
    def forward(ctx, h2, m):
        return placeholder(h2, h2.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def _attention_kwargs(attn) -> dict:
    """The keyword arguments the stock attention passes to its attention function."""
    name = type(attn).__name__
    if name == "MistralAttention":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    if name == "Qwen2Attention":
        return {"sliding_window": attn.sliding_window}
    return {}


def attention_core(attn, projs: dict[str, LoRAProj], x, position_embeddings, attention_mask, kept=None,
                   keep=None, **kwargs):
    """Attention up to (not including) o_proj: (B, S, heads * head_dim). With `kept` (a
    recompute) the rotated q, k and v are those of the first pass, not new products; with
    `keep` (a first pass under the checkpoint) they are handed to it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    b, s = x.shape[:2]
    d = attn.head_dim
    cos, sin = position_embeddings
    qkv = [projs["q_proj"], projs["k_proj"], projs["v_proj"]]
    if kept is not None:
        q, k, v = _KnownRotated.apply(*lora_projections(x, qkv, output=False), cos, sin, kept)
    else:
        q, k, v = lora_projections(x, qkv)
        q, k = rope_qk(q.view(b, s, -1, d), k.view(b, s, -1, d), cos, sin)
        v = v.view(b, s, -1, d)
        if keep is not None:
            for t in (q, k, v):      # KEPT_Q, KEPT_K, KEPT_V
                keep(t)
    window = _attention_kwargs(attn).get("sliding_window")
    if _PLAIN_CAUSAL[0] and (window is None or s <= window):   # a window as long as the row is causal
        attention_mask = None
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    out, _ = interface(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                       attention_mask, dropout=0.0 if not attn.training else attn.attention_dropout,
                       scaling=attn.scaling, **_attention_kwargs(attn), **kwargs)
    return out.reshape(b, s, -1)


def decoder_layer_forward(layer, projs: dict[str, LoRAProj], hidden_states, attention_mask=None,
                          position_ids=None, position_embeddings=None, **kwargs):
    """What the stock decoder layer computes (no cache), recomputing only what backward needs."""
    kwargs.pop("use_cache", None)
    kwargs.pop("past_key_values", None)
    replay = current_replay()
    # A recompute skips work only when its first pass kept everything (the same fast forward ran).
    recompute = replay is not None and replay.recompute and len(replay.kept) == KEPT_COUNT
    keep = replay.keep if replay is not None and not replay.recompute else None
    a = attention_core(layer.self_attn, projs, layer.input_layernorm(hidden_states), position_embeddings,
                       attention_mask, replay.kept if recompute else None, keep, position_ids=position_ids,
                       **kwargs)
    if recompute:
        o = lora_linear(a, projs["o_proj"], output=False)
        h2 = _KnownResidual.apply(hidden_states, o, replay.kept)
    else:
        h2 = hidden_states + lora_linear(a, projs["o_proj"])
        if keep is not None:
            keep(h2)                 # KEPT_H2
    n2 = layer.post_attention_layernorm(h2)
    m = lora_swiglu_mlp(n2, projs["gate_proj"], projs["up_proj"], projs["down_proj"], output=not recompute)
    return _Joined.apply(h2, m) if recompute else h2 + m
