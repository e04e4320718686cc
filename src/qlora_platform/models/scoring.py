"""Answer-token negative log-likelihood and holdout perplexity, token-weighted.

    result = holdout_perplexity(model, examples, batch_size=4)
    result["perplexity"], result["loss"], result["tokens"]

Training reads `answer_nll` for its loss (on the GPU fast path, `kernels.linear_cross_entropy`)
and the holdout perplexity for its evaluation, `qlora eval` the perplexity of the base and the
tuned model. `answer_nll` runs the output head only at the positions that predict a label.

`examples` are encoded records (`data.tokenize.encode_record`): only tokens with
a label (the assistant answers and their EOS) count, and every token weighs the
same, so long answers count for more than short ones. Perplexity = exp(summed
negative log-likelihood / number of labelled tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.collate import answer_token_count, collate, next_token_labels
from ..data.tokenize import IGNORE


def summed_answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood summed over labelled tokens (token t predicts t+1), in fp32."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)),
        next_token_labels(labels).reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


# Model types whose causal LM computes its logits as `lm_head(decoder(...).last_hidden_state)` and
# nothing more; others (softcapping, logit multipliers, multimodal wrappers) get the full logits.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3"})


def output_head_parts(model):
    """(decoder, head) when the logits are `head(decoder(...).last_hidden_state)` position by
    position: a model type in PLAIN_HEAD_MODEL_TYPES with a linear head, under no adapter but
    plain LoRA. None otherwise, and for a model an engine wraps (DDP, FSDP, DeepSpeed): its
    forward is what gathers shards and syncs gradients, so the model is run whole. `model` is the
    causal LM, PEFT-wrapped or not."""
    from peft import PeftModel, PeftType
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        # Prompt learning adds virtual tokens and aLoRA reads invocation offsets in PeftModel's forward.
        peft_config = model.active_peft_config
        if peft_config.peft_type != PeftType.LORA or getattr(peft_config, "alora_invocation_tokens", None):
            return None
        lm = model.get_base_model()
    elif isinstance(model, PreTrainedModel):
        lm = model
    else:
        return None
    head = lm.get_output_embeddings()
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if (
        lm.config.model_type not in PLAIN_HEAD_MODEL_TYPES
        or type(head) is not nn.Linear
        or head.bias is not None
        or decoder is None
        or decoder is lm
    ):
        return None
    return decoder, head


def answer_nll(model, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """`summed_answer_nll(model(**inputs).logits, labels)`, with the output head run only at the
    positions that predict a label: the prompt's positions need no logits, and the full logits
    of a batch are its largest tensor (docs/training.md, the CPU path). Where
    `output_head_parts` is None the model runs whole and gives the full logits."""
    parts = output_head_parts(model)
    if parts is None:
        return summed_answer_nll(model(**inputs).logits, labels)
    decoder, head = parts
    hidden = decoder(**inputs).last_hidden_state[:, :-1]
    targets = next_token_labels(labels)
    keep = targets != IGNORE
    return F.cross_entropy(head(hidden[keep]).float(), targets[keep], reduction="sum")


@torch.no_grad()
def holdout_perplexity(
    model, examples: list[dict], batch_size: int = 4, pad_id: int = 0, progress: bool = False
) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="perplexity", leave=False)
    for idx in batches:
        batch = collate([[examples[i]] for i in idx], pad_id, packing=False)
        labels = batch["labels"].to(device)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        total_nll += answer_nll(model, labels, use_cache=False, **inputs).item()
        total_tokens += answer_token_count(labels)
    if was_training:
        model.train()
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_tokens}


# Preference pairs: the answer log-probabilities DPO training and `qlora eval` rank pairs by.
def answer_rows(pairs: list[dict]) -> list[list[dict]]:
    """The chosen rows of `pairs`, then their rejected rows, as one-example rows for `collate`."""
    chosen = [{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"]} for p in pairs]
    rejected = [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]} for p in pairs]
    return [[ex] for ex in chosen + rejected]


def answer_logps(model, pairs: list[dict], pad_id: int) -> torch.Tensor:
    """[pairs, 2] log-probabilities of (chosen, rejected), from one padded forward of both rows."""
    rows = [row[0] for row in answer_rows(pairs)]
    return row_logps(model, rows, pad_id).view(2, len(pairs)).t()


@torch.no_grad()
def _in_eval_mode(model, items: list[dict], batch_size: int, desc: str, score) -> torch.Tensor:
    """score(model, items[k : k + batch_size]) for every batch in eval mode, on the CPU, concatenated."""
    was_training = model.training
    model.eval()
    starts = range(0, len(items), batch_size)
    if desc:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    try:
        parts = [score(model, items[k : k + batch_size]).float().cpu() for k in starts]
    finally:
        if was_training:
            model.train()
    return torch.cat(parts) if parts else torch.zeros(0)


def sequence_logps(model, pairs: list[dict], batch_size: int, pad_id: int, desc: str = "") -> torch.Tensor:
    """[pairs, 2] answer log-probabilities of every pair in eval mode, batch_size pairs a forward."""
    out = _in_eval_mode(model, pairs, batch_size, desc, lambda m, chunk: answer_logps(m, chunk, pad_id))
    return out.view(len(pairs), 2)


# Single answers (KTO's completions): the same log-probabilities, one row per example.
def row_logps(model, rows: list[dict], pad_id: int) -> torch.Tensor:
    """[rows] answer log-probabilities of encoded examples ({'input_ids', 'labels'}), one padded forward."""
    batch = collate([[ex] for ex in rows], pad_id, packing=False)
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    ).logits
    labels = batch["labels"].to(device)
    return -torch.stack([summed_answer_nll(logits[r : r + 1], labels[r : r + 1]) for r in range(labels.size(0))])


def rows_logps(model, rows: list[dict], batch_size: int, pad_id: int, desc: str = "") -> torch.Tensor:
    """[rows] answer log-probabilities of every example in eval mode, batch_size rows a forward."""
    return _in_eval_mode(model, rows, batch_size, desc, lambda m, chunk: row_logps(m, chunk, pad_id))
