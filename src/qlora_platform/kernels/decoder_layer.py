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
- where SDPA would run cuDNN's causal attention (CUDA, no mask, no dropout), the first pass
  calls that op itself and also keeps its output (parked) and log-sum-exp (on the GPU,
  B x heads x S floats); the recompute then skips attention's forward and backward calls
  cuDNN's attention backward directly (`_KnownAttention`): a forward call saved per layer
  for the log-sum-exp's extra host traffic (docs/benchmarks.md).
- packed rows (train/batching.py) pass `cu_seq_lens`, their sequences' boundaries over the
  flattened rows: attention is then causal within each sequence, with no mask. On CUDA it
  is FlashAttention's variable-length kernel (fixed shapes whatever the boundaries, so a
  CUDA graph captures it), kept and reused by the recompute like cuDNN's above
  (`_VarlenAttention`); elsewhere `varlen_attention_reference`, a dense block-diagonal mask.
"""

from __future__ import annotations

import functools
import sys

import torch

from .lora import LoRAProj, fold_columns, fused_columns, lora_linear, lora_projections, lora_swiglu_mlp, placeholder
from .offload import replay_of
from .rmsnorm import RMSNORM_CLASSES, residual_rms_norm
from .rope import rope_backward, rope_qk

# What the first pass keeps for the recompute (by name); "attn", "lse" and "attn_aux" only when
# attention ran as cuDNN's op directly (then the recompute skips attention's forward too).
REQUIRED = ({"q", "k", "v", "h2"}, {"qkv", "h2"})  # either form of q, k, v

ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}


class _KnownResidual(torch.autograd.Function):
    """h2 = x + o where the value of h2 is known (kept from the first pass) and o was not
    computed: returns the known value, passes the gradient to both summands."""

    @staticmethod
    def forward(ctx, x, o, known):
        return known["h2"]

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
        return _kept_qkv(known, q_placeholder.shape[-1], k_placeholder.shape[-1], *q_placeholder.shape[:2])

    @staticmethod
    def backward(ctx, dq, dk, dv):
        # Written side by side into one (B, S, q + 2 kv) buffer: the projections' backward then
        # takes it whole (folded, lora.py) without concatenating.
        cos, sin = ctx.saved_tensors
        b, s = dq.shape[:2]
        widths = [g.shape[2] * g.shape[3] for g in (dq, dk, dv)]
        both = torch.empty(b, s, sum(widths), dtype=dq.dtype, device=dq.device)
        gq, gk, gv = (t.view(b, s, -1, dq.shape[3]) for t in both.split(widths, dim=-1))
        rope_backward(dq, cos, sin, out=gq)
        rope_backward(dk, cos, sin, out=gk)
        gv.copy_(dv)
        return (*(t.flatten(2) for t in (gq, gk, gv)), None, None, None)


def _kept_qkv(known: dict, q_width: int, kv_width: int, b: int, s: int):
    """The first pass's rotated q, k, v: kept one by one, or as the folded projections' single
    (B, S, q + 2 kv) buffer whose column blocks they are."""
    if "qkv" not in known:
        return known["q"], known["k"], known["v"]
    qkv = known["qkv"]
    d = known["head_dim"]
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    return q.view(b, s, -1, d), k.view(b, s, -1, d), v.view(b, s, -1, d)


class _Joined(torch.autograd.Function):
    """The layer output h2 + m when nobody reads its value (recompute): gradient to both."""

    @staticmethod
    def forward(ctx, h2, m):
        return placeholder(h2, h2.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


class _KnownAttention(torch.autograd.Function):
    """Causal attention whose output and log-sum-exp are known from the first pass: returns
    the output; backward is cuDNN's attention backward (what SDPA's autograd would run), so
    the recompute does not run attention's forward again. q, k, v: (B, S, heads, d)."""

    @staticmethod
    def forward(ctx, q, k, v, known, scale):
        ctx.save_for_backward(q, k, v, known["attn"], known["lse"])
        ctx.aux, ctx.scale = known["attn_aux"], scale
        return known["attn"]

    @staticmethod
    def backward(ctx, da):
        q, k, v, a, lse = ctx.saved_tensors
        b, s, hq, d = q.shape
        cum_q, cum_k, max_q, max_k, seed, offset = ctx.aux
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            da.contiguous().view(b, s, hq, d).transpose(1, 2),
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            a.view(b, s, hq, d).transpose(1, 2),
            lse,
            seed,
            offset,
            None,
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            True,
            scale=ctx.scale,
        )
        return (*(g.transpose(1, 2) for g in grads), None, None)


@functools.cache
def cudnn_attention_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether this torch build and GPU run cuDNN's causal attention op and its backward (what
    `_direct_attention` and `_KnownAttention` call) for this dtype and head size: tried once on a
    tiny problem, the answer cached (a property of the build and the GPU, not of any model).
    `cudnn_attention_available.cache_clear()` resets it."""
    q = torch.zeros(1, 1, 64, head_dim, dtype=dtype, device=device)
    try:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, True, False)
        torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            q, q, q, q, out[0], out[1], out[6], out[7], None, out[2], out[3], out[4], out[5], 0.0, True
        )
    except (RuntimeError, AttributeError):  # NotImplementedError (no CUDA kernel) is a RuntimeError
        return False
    return True


def _direct_attention_applies(attn, q, attention_mask, window) -> bool:
    """Whether the first pass may call cuDNN's attention op itself (what SDPA picks on Hopper for
    this case) and keep what its backward needs: SDPA, causal, no mask, no dropout, and a build
    and GPU that have the op for this dtype and head size."""
    s = q.shape[1]
    return (
        q.is_cuda
        and attn.config._attn_implementation == "sdpa"
        and attention_mask is None
        and s > 1
        and (window is None or s <= window)
        and not (attn.training and attn.attention_dropout)
        and getattr(attn, "is_causal", True)
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in (64, 128)
        and cudnn_attention_available(q.device, q.dtype, q.shape[-1])
    )


def _direct_attention(attn, q, k, v, keep):
    """First pass: cuDNN causal attention; keeps its output, log-sum-exp and bookkeeping. None
    when cuDNN refuses this call's shapes (the op exists: `cudnn_attention_available`): this call
    then runs the model's attention function, and nothing is remembered."""
    b, s = q.shape[:2]
    try:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, True, False, scale=attn.scaling
        )
    except RuntimeError:
        return None
    a = out[0].transpose(1, 2).reshape(b, s, -1)
    keep("attn", a)
    keep("lse", out[1], park=False)  # B x heads x S floats: stays on the GPU
    keep("attn_aux", (out[2], out[3], out[4], out[5], out[6], out[7]), park=False)
    return a


def varlen_attention_reference(q, k, v, cu_seq_lens, scale):
    """Causal attention within each sequence that `cu_seq_lens` bounds over the flattened rows
    (boundaries at row ends included), in plain PyTorch through a dense mask. q: (B, S, hq, d);
    k, v: (B, S, hkv, d), hq a multiple of hkv. Returns (B, S, hq * d)."""
    b, s, hq, d = q.shape
    tokens = torch.arange(b * s, device=q.device)
    seq = torch.searchsorted(cu_seq_lens[1:].to(device=q.device, dtype=torch.long), tokens, right=True).view(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal
    rep = hq // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) if rep > 1 else t for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale
    )
    return out.transpose(1, 2).reshape(b, s, hq * d)


def _flash_varlen(q, k, v, cu_seq_lens, scale):
    """FlashAttention's variable-length causal forward over the flattened rows; the longest
    sequence is bounded by the row width, a constant, so the call's shapes never change."""
    b, s, hq, d = q.shape
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q.reshape(b * s, hq, d),
        k.reshape(b * s, -1, d),
        v.reshape(b * s, -1, d),
        cu_seq_lens,
        cu_seq_lens,
        s,
        s,
        0.0,
        True,
        False,
        scale=scale,
    )
    return out.view(b, s, hq * d), lse, (rng, unused)


class _VarlenAttention(torch.autograd.Function):
    """Variable-length causal attention on CUDA (`_flash_varlen`); with `known` (a recompute)
    the output and log-sum-exp are the first pass's and forward computes nothing. Backward is
    FlashAttention's variable-length backward. q: (B, S, hq, d); k, v: (B, S, hkv, d)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seq_lens, scale, known):
        if known is None:
            out, lse, aux = _flash_varlen(q, k, v, cu_seq_lens, scale)
        else:
            out, lse, aux = known["attn"], known["lse"], known["varlen_aux"]
        ctx.save_for_backward(q, k, v, out, lse, cu_seq_lens)
        ctx.aux, ctx.scale = aux, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        b, s, hq, d = q.shape
        flat = [t.reshape(b * s, -1, d) for t in (dout, q, k, v, out)]
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            flat[0].contiguous(), *flat[1:], lse, cu, cu, s, s, 0.0, True, *ctx.aux, scale=ctx.scale
        )
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), None, None, None


def _flash_varlen_applies(attn, q, window) -> bool:
    s = q.shape[1]
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and (window is None or s <= window)
        and not (attn.training and attn.attention_dropout)
    )


def _varlen_attention(attn, q, k, v, cu_seq_lens, window, keep=None, kept=None):
    """Attention of packed rows, (B, S, heads * head_dim); see the module doc."""
    if kept is not None and "varlen_aux" in kept:
        return _VarlenAttention.apply(q, k, v, cu_seq_lens, attn.scaling, kept)
    if not _flash_varlen_applies(attn, q, window):
        if window is not None and q.shape[1] > window:
            raise ValueError(
                "packed rows longer than the sliding window need a mask; pass position_ids without cu_seq_lens"
            )
        return varlen_attention_reference(q, k, v, cu_seq_lens, attn.scaling)
    if keep is None:
        return _VarlenAttention.apply(q, k, v, cu_seq_lens, attn.scaling, None)
    out, lse, aux = _flash_varlen(q, k, v, cu_seq_lens, attn.scaling)
    keep("attn", out)
    keep("lse", lse, park=False)  # heads x tokens floats: stays on the GPU
    keep("varlen_aux", aux, park=False)
    return out


def _attention_kwargs(attn) -> dict:
    """The keyword arguments the stock attention passes to its attention function."""
    name = type(attn).__name__
    if name == "MistralAttention":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    if name == "Qwen2Attention":
        return {"sliding_window": attn.sliding_window}
    return {}


def attention_core(
    attn,
    projs: dict[str, LoRAProj],
    x,
    position_embeddings,
    attention_mask,
    kept=None,
    keep=None,
    cu_seq_lens=None,
    causal_only=False,
    **kwargs,
):
    """Attention up to (not including) o_proj: (B, S, heads * head_dim). With `kept` (a
    recompute) the rotated q, k and v are those of the first pass, not new products; with
    `keep` (a first pass under the checkpoint) they are handed to it. With `cu_seq_lens`
    (packed rows) attention is causal within each sequence and any mask is ignored. With
    `causal_only` (the batch has no padding mask and no packing: train/model.summed_nll says so)
    the mask the model built is the causal one and is dropped: under CUDA graph capture
    transformers cannot check that (it would wait on the GPU) and builds a dense mask, which
    would move attention off its fastest kernels."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    b, s = x.shape[:2]
    d = attn.head_dim
    cos, sin = position_embeddings
    qkv = [projs["q_proj"], projs["k_proj"], projs["v_proj"]]
    window = _attention_kwargs(attn).get("sliding_window")
    if causal_only and (window is None or s <= window):  # a window as long as the row is causal
        attention_mask = None
    if kept is not None:
        q, k, v = _KnownRotated.apply(*lora_projections(x, qkv, output=False), cos, sin, kept)
        if cu_seq_lens is not None:
            return _varlen_attention(attn, q, k, v, cu_seq_lens, window, kept=kept)
        if "attn" in kept:
            return _KnownAttention.apply(q, k, v, kept, attn.scaling)
    else:
        q, k, v = lora_projections(x, qkv)
        q, k = rope_qk(q.view(b, s, -1, d), k.view(b, s, -1, d), cos, sin)
        v = v.view(b, s, -1, d)
        if keep is not None:
            fused = fused_columns(q.flatten(2), k.flatten(2), v.flatten(2))
            if fused is not None:  # folded projections: one buffer, one copy
                keep("qkv", fused)
                keep("head_dim", d, park=False)
            else:
                for name, t in (("q", q), ("k", k), ("v", v)):
                    keep(name, t)
            if cu_seq_lens is not None:
                return _varlen_attention(attn, q, k, v, cu_seq_lens, window, keep=keep)
            if _direct_attention_applies(attn, q, attention_mask, window):
                a = _direct_attention(attn, q, k, v, keep)
                if a is not None:
                    return a
    if cu_seq_lens is not None:
        return _varlen_attention(attn, q, k, v, cu_seq_lens, window)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    out, _ = interface(
        attn,
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        **_attention_kwargs(attn),
        **kwargs,
    )
    return out.reshape(b, s, -1)


def _stream_and_norm(norm, x, consumers=()):
    """(x, norm(x)) for a residual stream x; with the RMSNorm kernel, the stream's gradient is
    added inside the norm's backward kernel (rmsnorm.residual_rms_norm), and the output leaves
    room for the x A^T columns of the projections that consume it folded (lora.fold_columns)."""
    if type(norm).__name__ in RMSNORM_CLASSES:
        return residual_rms_norm(x, norm.weight, norm.variance_epsilon, fold_columns(x, consumers))
    return x, norm(x)


def decoder_layer_forward(
    layer,
    projs: dict[str, LoRAProj],
    hidden_states,
    attention_mask=None,
    position_ids=None,
    position_embeddings=None,
    **kwargs,
):
    """What the stock decoder layer computes (no cache), recomputing only what backward needs."""
    kwargs.pop("use_cache", None)
    kwargs.pop("past_key_values", None)
    replay = replay_of(layer)  # set while the model's Offloader runs this layer as a checkpoint
    # A recompute skips work only when its first pass kept everything (the same fast forward ran).
    kept = None
    if replay is not None and replay.recompute and any(r <= replay.kept.keys() for r in REQUIRED):
        kept = replay.kept
    keep = replay.keep if replay is not None and not replay.recompute else None
    qkv = [projs["q_proj"], projs["k_proj"], projs["v_proj"]]
    hidden_states, n1 = _stream_and_norm(layer.input_layernorm, hidden_states, qkv)
    a = attention_core(
        layer.self_attn,
        projs,
        n1,
        position_embeddings,
        attention_mask,
        kept,
        keep,
        position_ids=position_ids,
        **kwargs,
    )
    if kept is not None:
        o = lora_linear(a, projs["o_proj"], output=False)
        h2 = _KnownResidual.apply(hidden_states, o, kept)
    else:
        h2 = lora_linear(a, projs["o_proj"], residual=hidden_states)
        if keep is not None:
            keep("h2", h2)
    h2, n2 = _stream_and_norm(layer.post_attention_layernorm, h2, [projs["gate_proj"], projs["up_proj"]])
    if kept is not None:
        m = lora_swiglu_mlp(n2, projs["gate_proj"], projs["up_proj"], projs["down_proj"], output=False)
        return _Joined.apply(h2, m)
    return lora_swiglu_mlp(n2, projs["gate_proj"], projs["up_proj"], projs["down_proj"], residual=h2)
