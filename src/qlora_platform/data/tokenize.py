"""Chat records to token ids and labels, with the loss on assistant tokens only.

The conversation is rendered once with the tokenizer's own chat template and
tokenized with character offsets; the character span of each assistant answer is
found by rendering the conversation up to that answer (with the generation
prompt) and up to its end. Tokens inside a span keep their ids as labels, all
others get -100. The span runs through the end-of-turn token (EOS), so the model
learns to stop; if a template adds no EOS, one is appended and labelled.

    ex = encode_record(tokenizer, {"messages": [...]}, max_seq_len=384)
    ex["input_ids"], ex["labels"], ex["truncated"]

Plain `{"text": ...}` records are labelled on every token and end with EOS. Tool records
(`{"tools", "messages"}`, data/tools.py) render through `template_inputs`: the template's own
tool format where it has one, else the platform's; calls are assistant tokens, tool results not.
"""

from __future__ import annotations

from ..errors import UserError
from .tools import template_inputs

IGNORE = -100


def render_chat(
    tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> str:
    # transformers renders templates in a sandboxed Jinja environment.
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character span of each assistant answer."""
    messages, tools = template_inputs(tokenizer, messages, tools)
    full = render_chat(tokenizer, messages, tools=tools)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render_chat(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(before) or not full.startswith(upto):
            raise UserError(
                "the chat template renders a conversation differently from its prefixes, so "
                "assistant tokens cannot be located; use a standard chat template"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_record(tokenizer, record: dict, max_seq_len: int) -> dict:
    """{'input_ids', 'labels', 'length', 'truncated'} for one chat or text record."""
    eos_id = tokenizer.eos_token_id
    # Records longer than the model's context are tokenized whole on purpose (to report their full
    # length before truncating): verbose=False keeps transformers' sequence-length warning out of it.
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False, verbose=False)["input_ids"] + [eos_id]
        labels = list(ids)
    else:
        text, spans = assistant_spans(tokenizer, record["messages"], record.get("tools"))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        for start, end in spans:
            last = None
            for t, (a, b) in enumerate(offsets):
                if b > start and a < end and b > a:  # overlaps: a token may straddle the boundary
                    labels[t] = ids[t]
                    last = t
            if last is None:
                continue
            # Stop the labels at the end-of-turn token: whitespace the template adds
            # after it (a newline) is not part of the answer.
            eos_at = next((t for t in range(last, -1, -1) if ids[t] == eos_id and labels[t] != IGNORE), None)
            if eos_at is not None:
                for t in range(eos_at + 1, last + 1):
                    labels[t] = IGNORE
            else:
                ids.insert(last + 1, eos_id)
                labels.insert(last + 1, eos_id)
                offsets.insert(last + 1, (end, end))
    full_length = len(ids)
    truncated = full_length > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "length": full_length, "truncated": truncated}


def encode_records(tokenizer, records: list[dict], max_seq_len: int, drop_unlabelled: bool = True):
    """Encode many records; those left with no label after truncation are counted, not kept."""
    out, dropped = [], 0
    for rec in records:
        ex = encode_record(tokenizer, rec, max_seq_len)
        if drop_unlabelled and all(lab == IGNORE for lab in ex["labels"]):
            dropped += 1
            continue
        out.append(ex)
    return out, dropped
