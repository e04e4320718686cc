from qlora_platform.data.tokenize import IGNORE, encode_record


def _labelled_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


def test_only_assistant_tokens_are_labelled_and_end_with_eos(tokenizer):
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris is the capital."},
        ]
    }
    ex = encode_record(tokenizer, rec, 256)
    assert _labelled_text(tokenizer, ex) == "Paris is the capital.<|im_end|>"
    labelled = [lab for lab in ex["labels"] if lab != IGNORE]
    assert labelled[-1] == tokenizer.eos_token_id
    # Everything before the answer (system, user, the assistant header) is masked.
    first = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE)
    assert tokenizer.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert not ex["truncated"]


def test_every_assistant_turn_is_labelled(tokenizer):
    rec = {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "Second answer."},
        ]
    }
    ex = encode_record(tokenizer, rec, 256)
    text = _labelled_text(tokenizer, ex)
    assert text == "First answer.<|im_end|>Second answer.<|im_end|>"
    assert "two" not in text


def test_text_records_are_labelled_fully_with_eos(tokenizer):
    ex = encode_record(tokenizer, {"text": "Plain domain text."}, 64)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_is_flagged(tokenizer):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}]}
    ex = encode_record(tokenizer, rec, 32)
    assert ex["truncated"] and len(ex["input_ids"]) == 32 and ex["length"] > 200


def test_template_without_eos_gets_one_appended_and_labelled(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}
    ex = encode_record(tok, rec, 64)
    labelled = [lab for lab in ex["labels"] if lab != IGNORE]
    assert labelled[-1] == tok.eos_token_id
    assert tok.decode(labelled[:-1]).strip() == "Hello."


def test_long_records_do_not_print_the_sequence_length_warning(tokenizer):
    import copy
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = 16
    tok.deprecation_warnings = {}
    seen = Collect()
    logger = logging.getLogger("transformers")  # transformers' loggers stop propagating here
    logger.addHandler(seen)
    try:
        ex = encode_record(tok, {"text": "word " * 100}, 32)
        ex2 = encode_record(
            tok, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 100}]}, 32
        )
        quiet = list(seen.messages)
        tok.deprecation_warnings = {}
        tok("word " * 100, add_special_tokens=False)  # the check itself is live
    finally:
        logger.removeHandler(seen)
    assert ex["truncated"] and ex2["truncated"]
    assert not [m for m in quiet if "Token indices sequence length" in m]
    assert [m for m in seen.messages if "Token indices sequence length" in m]
