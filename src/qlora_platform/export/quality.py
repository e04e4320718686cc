"""Perplexity of a Hugging Face model computed exactly as llama.cpp's `llama-perplexity` does.

    ppl = chunked_perplexity(model, tokenizer, text, n_ctx=512)

So that the merged HF model and its GGUF files are scored on the same tokens the same
way: the text is tokenized once (BOS first when the tokenizer adds one), cut into
whole chunks of `n_ctx` tokens (the remainder is dropped), each chunk starts with BOS
when the vocabulary adds one, and only the second half of each chunk is scored (each
scored token has at least n_ctx/2 tokens of context). PPL = exp(mean NLL).
"""

from __future__ import annotations

import math

import torch


def holdout_text(records: list[dict]) -> str:
    """The answers of the holdout records, one after another: the text every model is scored on."""
    from ..data.formats import answer_of

    return "\n\n".join(answer_of(r).strip() for r in records if answer_of(r).strip()) + "\n"


@torch.no_grad()
def chunked_perplexity(model, tokenizer, text: str, n_ctx: int = 512) -> dict:
    add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None
    # The whole holdout is tokenized at once on purpose and then cut into n_ctx chunks: verbose=False keeps
    # transformers' warning about sequences longer than the model's maximum out of the export log.
    tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if add_bos:
        tokens = [tokenizer.bos_token_id] + tokens
    n_chunks = len(tokens) // n_ctx
    if n_chunks < 2:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity with a context of {n_ctx} needs {2 * n_ctx}")
    model.eval()
    device = next(model.parameters()).device
    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(n_chunks):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if add_bos:
            chunk[0] = tokenizer.bos_token_id
        ids = torch.tensor([chunk], device=device)
        logits = model(input_ids=ids).logits[0].float()
        # Logits at positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1.
        logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        target = ids[0, first + 1 : n_ctx]
        nll -= float(logp.gather(1, target.unsqueeze(1)).sum())
        count += n_ctx - first - 1
    return {"perplexity": math.exp(nll / count), "chunks": n_chunks, "tokens_scored": count, "n_ctx": n_ctx}
