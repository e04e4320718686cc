"""The one-token decode step of Llama-family models (Llama, Mistral, Qwen2), owned by the platform.

    step = DecodeStep.build(model, cache_layers, writes, mask)    # or raises Unsupported
    logits = step(token, position)        # token, position (B, 1) -> logits (B, V)

`static_decode.StaticDecoder` runs this instead of the model's own forward for every decode
step (the prompt's prefill stays the model's forward, into the same cache tensors). It
calls the model's modules for every matrix product (plain, bitsandbytes 4-bit or PEFT LoRA
layers alike, so adapters and their on/off state behave as in the stock forward) and
replaces only what lies between them with the kernels of `kernels/decode.py`: the residual
add fused into RMSNorm, RoPE fused with the cache write, and one attention kernel that
reads grouped-query keys in place and stops at each row's own length. That is about a
dozen launches a layer instead of about 45, which is most of a CUDA-graph step's time
at batch 1 beyond reading the weights (docs/benchmarks.md).

Models outside the family, or with sliding windows, biased norms or head sizes the
kernels do not tile, raise `Unsupported` and keep the stock forward (the reason is kept).
"""

from __future__ import annotations

import torch

from ..kernels.decode import add_rms_norm, decode_attention, decode_kernels_fit, rope_write_kv
from ..kernels.swiglu import swiglu_forward

FAMILY = {"llama", "mistral", "qwen2"}


class Unsupported(Exception):
    """This model keeps the stock forward for decode steps; the message says why."""


def causal_lm(model):
    """The transformers *ForCausalLM under a PEFT wrapper, or the model itself."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


def check_supported(lm, max_len: int) -> None:
    cfg = lm.config
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILY:
        raise Unsupported(f"model type {kind!r} is not one of {sorted(FAMILY)}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {cfg.hidden_act!r} (the step fuses SiLU)")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
        raise Unsupported(f"sliding window of {window} tokens is shorter than the cache ({max_len})")
    attn = lm.model.layers[0].self_attn
    if not decode_kernels_fit(attn.head_dim):
        raise Unsupported(f"head size {attn.head_dim} (the kernels need a power of two >= 16)")
    dtype = lm.model.embed_tokens.weight.dtype
    for layer in lm.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != dtype or getattr(norm, "bias", None) is not None:
                raise Unsupported("norm weights in another dtype than the activations")


class DecodeStep:
    def __init__(self, lm, cache_layers, writes, mask):
        self.lm, self.cache_layers, self.writes, self.mask = lm, cache_layers, writes, mask
        cfg = lm.config
        self.layers = list(lm.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.norms = [layer.input_layernorm for layer in self.layers] + [lm.model.norm]

    @classmethod
    def build(cls, model, cache_layers, writes, mask, max_len: int) -> DecodeStep:
        lm = causal_lm(model)
        check_supported(lm, max_len)
        return cls(lm, cache_layers, writes, mask)

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        hidden = lm.model.embed_tokens(token)  # (B, 1, H), the residual stream
        rope = self.rope(hidden, position)
        x = _add_norm(None, hidden, self.norms[0])
        for i in range(len(self.layers)):
            x = self.layer(i, hidden, x, rope)
        return lm.lm_head(x)[:, -1]

    def rope(self, hidden, position) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.lm.model.rotary_emb(hidden, position)  # (B, 1, D) in the model's dtype
        rows = hidden.shape[0]
        return cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous()

    def layer(
        self, i: int, hidden: torch.Tensor, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Decoder layer i on the residual stream `hidden` (updated in place) whose norm is x;
        returns the norm the next layer (or the head) takes."""
        layer, rows = self.layers[i], hidden.shape[0]
        attn, mlp, cache = layer.self_attn, layer.mlp, self.cache_layers[i]
        q = attn.q_proj(x).view(rows, self.heads, self.head_dim)
        k = attn.k_proj(x).view(rows, self.kv_heads, self.head_dim)
        v = attn.v_proj(x).view(rows, self.kv_heads, self.head_dim)
        columns = self.writes.columns
        q = rope_write_kv(q, k, v, *rope, cache.keys, cache.values, columns)
        out = decode_attention(q, cache.keys, cache.values, self.mask, columns, self.scale)
        x = _add_norm(attn.o_proj(out.view(rows, 1, -1)), hidden, layer.post_attention_layernorm)
        mlp_out = mlp.down_proj(swiglu_forward(mlp.gate_proj(x), mlp.up_proj(x)))
        return _add_norm(mlp_out, hidden, self.norms[i + 1])  # the next layer's (or the final) norm


def _add_norm(delta, hidden, norm):
    """hidden += delta (in place: the residual stream), then the norm of it."""
    return add_rms_norm(delta, hidden, norm.weight, norm.variance_epsilon)
