"""Preference pairs (and KTO and prompt-only records) to token ids and labels, as `tokenize.py` labels SFT.

The prompt is rendered once with the tokenizer's chat template and its generation prompt, and
tokenized once. Each answer is the text the template adds for it as the next assistant turn (the
answer and its end-of-turn), located with `assistant_spans` as for SFT, and its tokens follow the
prompt's. Answer tokens keep their ids as labels through the end-of-turn token (EOS; appended when
the template adds none); prompt tokens get IGNORE. So chosen and rejected start with the same prompt
ids, and their labels are those `encode_record` gives the same conversation.

Answers are never cut: when the prompt and the longer answer exceed max_seq_len, the prompt loses
tokens from its left (its start: the system prompt, earlier turns); when the longer answer leaves no
room for one prompt token, the pair is dropped (`encode_pair` returns None, `encode_pairs` counts it).

    ex = encode_pair(tokenizer, {"prompt": [...], "chosen": "...", "rejected": "..."}, max_seq_len=512)
    ex["prompt_input_ids"], ex["chosen_input_ids"], ex["chosen_labels"], ex["rejected_input_ids"], ...
"""

from __future__ import annotations

from .tokenize import IGNORE, assistant_spans, render_chat


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """The prompt rendered with the generation prompt (the assistant header), as token ids."""
    text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def answer_ids(tokenizer, prompt: list[dict], ids: list[int], answer: str) -> list[int]:
    """The ids of `answer` as the next assistant turn after `prompt` (tokenized as `ids`), through EOS."""
    full, spans = assistant_spans(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    start, end = spans[-1]
    joint = tokenizer(full[:end], add_special_tokens=False, verbose=False)["input_ids"]
    if joint[: len(ids)] == ids:
        out = joint[len(ids) :]  # the tokens the SFT encoding of this conversation has
    else:  # a token straddles the prompt's end: the answer alone, so the prompt ids stay shared
        out = tokenizer(full[start:end], add_special_tokens=False, verbose=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    if eos_id in out:  # whitespace the template adds after the end-of-turn is not part of the answer
        return out[: len(out) - out[::-1].index(eos_id)]
    return [*out, eos_id]


def _fit_prompt(ids: list[int], answer_len: int, max_seq_len: int) -> list[int] | None:
    """The prompt ids that fit beside an answer of `answer_len` tokens (cut from the left), or None."""
    room = max_seq_len - answer_len
    if room < 1:
        return None
    return ids[-room:] if len(ids) > room else ids


def _sequence(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    return prompt + answer, [IGNORE] * len(prompt) + answer


def encode_pair(tokenizer, record: dict, max_seq_len: int) -> dict | None:
    """{'prompt_input_ids', 'chosen_input_ids', 'chosen_labels', 'rejected_input_ids', 'rejected_labels',
    'length', 'truncated'} for one normalised pair, or None when the longer answer does not fit.
    `length` is the prompt plus the longer answer before truncation; `truncated` says the prompt was cut."""
    ids = prompt_ids(tokenizer, record["prompt"])
    chosen = answer_ids(tokenizer, record["prompt"], ids, record["chosen"])
    rejected = answer_ids(tokenizer, record["prompt"], ids, record["rejected"])
    longer = max(len(chosen), len(rejected))
    kept = _fit_prompt(ids, longer, max_seq_len)
    if kept is None:
        return None
    chosen_ids, chosen_labels = _sequence(kept, chosen)
    rejected_ids, rejected_labels = _sequence(kept, rejected)
    return {
        "prompt_input_ids": kept,
        "chosen_input_ids": chosen_ids,
        "chosen_labels": chosen_labels,
        "rejected_input_ids": rejected_ids,
        "rejected_labels": rejected_labels,
        "length": len(ids) + longer,
        "truncated": len(kept) < len(ids),
    }


def encode_pairs(tokenizer, records: list[dict], max_seq_len: int) -> tuple[list[dict], int]:
    """Encode many pairs; those whose longer answer does not fit are counted, not kept."""
    out, dropped = [], 0
    for rec in records:
        ex = encode_pair(tokenizer, rec, max_seq_len)
        if ex is None:
            dropped += 1
            continue
        out.append(ex)
    return out, dropped


def encode_kto(tokenizer, record: dict, max_seq_len: int) -> dict | None:
    """{'prompt_input_ids', 'completion_input_ids', 'completion_labels', 'label', 'length', 'truncated'}
    for one normalised KTO record, or None when its completion does not fit; the same rules as pairs."""
    ids = prompt_ids(tokenizer, record["prompt"])
    completion = answer_ids(tokenizer, record["prompt"], ids, record["completion"])
    kept = _fit_prompt(ids, len(completion), max_seq_len)
    if kept is None:
        return None
    input_ids, labels = _sequence(kept, completion)
    return {
        "prompt_input_ids": kept,
        "completion_input_ids": input_ids,
        "completion_labels": labels,
        "label": record["label"],
        "length": len(ids) + len(completion),
        "truncated": len(kept) < len(ids),
    }


def encode_prompt(tokenizer, record: dict, max_seq_len: int) -> dict:
    """{'prompt_input_ids', 'length', 'truncated'} for a prompt-only record: its last max_seq_len tokens."""
    ids = prompt_ids(tokenizer, record["prompt"])
    return {"prompt_input_ids": ids[-max_seq_len:], "length": len(ids), "truncated": len(ids) > max_seq_len}


def token_lengths(tokenizer, record: dict) -> tuple[int, int]:
    """(prompt tokens, answer tokens) of a normalised non-SFT record: the longer answer of a pair, the
    completion of a KTO record, 0 for a prompt-only record."""
    ids = prompt_ids(tokenizer, record["prompt"])
    answers = [record[k] for k in ("chosen", "rejected", "completion") if k in record]
    return len(ids), max((len(answer_ids(tokenizer, record["prompt"], ids, a)) for a in answers), default=0)
