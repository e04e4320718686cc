import json

import pytest

from qlora_platform.data.formats import normalise_key
from qlora_platform.data.preference import detect_kind, load_kind_records, prompt_text, to_kind_record
from qlora_platform.data.preference_sample import build_sample_preferences
from qlora_platform.data.preference_tokenize import encode_kto, encode_pair, encode_pairs, encode_prompt
from qlora_platform.data.prepare import format_report, prepare
from qlora_platform.data.tokenize import IGNORE, encode_record
from qlora_platform.data.validate import validate_file
from qlora_platform.errors import UserError
from tests.conftest import chat, write_jsonl

Q, GOOD, BAD = "What does len() return?", "The number of items.", "A sorted copy."
USER = [{"role": "user", "content": Q}]
PAIR = {"prompt": USER, "chosen": GOOD, "rejected": BAD}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


PAIR_SHAPES = {
    "trl-strings": {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    "trl-conversational": {"prompt": USER, "chosen": [_assistant(GOOD)], "rejected": [_assistant(BAD)]},
    "trl-implicit-prompt": {"chosen": [*USER, _assistant(GOOD)], "rejected": [*USER, _assistant(BAD)]},
    "llamafactory-alpaca": {"instruction": Q, "input": "", "chosen": GOOD, "rejected": BAD},
    "llamafactory-sharegpt": {
        "conversations": [{"from": "human", "value": Q}],
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
    "messages-with-answer-messages": {"messages": USER, "chosen": _assistant(GOOD), "rejected": _assistant(BAD)},
    "normalised": PAIR,
}


@pytest.mark.parametrize("shape", PAIR_SHAPES)
def test_each_pair_shape_normalises_to_the_same_record(shape):
    raw = PAIR_SHAPES[shape]
    assert detect_kind(raw) == "preference"
    assert to_kind_record(raw, "p.jsonl:1") == PAIR


def test_a_system_prompt_comes_first_in_every_shape_that_has_one():
    system = {"role": "system", "content": "Be exact."}
    want = {"prompt": [system, *USER], "chosen": GOOD, "rejected": BAD, "category": "builtins"}
    shapes = [
        {"instruction": Q, "system": "Be exact.", "chosen": GOOD, "rejected": BAD, "category": "builtins"},
        {
            "conversations": [{"from": "human", "value": Q}],
            "system": "Be exact.",
            "chosen": {"from": "gpt", "value": GOOD},
            "rejected": {"from": "gpt", "value": BAD},
            "category": "builtins",
        },
        {"prompt": [system, *USER], "chosen": GOOD, "rejected": BAD, "category": "builtins"},
    ]
    for raw in shapes:
        assert to_kind_record(raw, "p.jsonl:1") == want
    alpaca = to_kind_record({"instruction": "Sum", "input": "1 2", "chosen": "3", "rejected": "4"}, "p.jsonl:1")
    assert alpaca["prompt"] == [_user("Sum\n\n1 2")]


def test_kto_and_prompt_only_shapes_normalise():
    want = {"prompt": USER, "completion": GOOD, "label": True}
    kto_shapes = [
        {"prompt": Q, "completion": GOOD, "label": True},
        {"prompt": USER, "completion": [_assistant(GOOD)], "label": True},
        {"messages": [*USER, _assistant(GOOD)], "kto_tag": True},
        {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": GOOD}], "kto_tag": True},
        {"instruction": Q, "output": GOOD, "kto_tag": True},
        want,
    ]
    for raw in kto_shapes:
        assert detect_kind(raw) == "kto"
        assert to_kind_record(raw, "k.jsonl:1") == want
    for raw in ({"prompt": Q}, {"prompt": USER, "id": 7}):
        assert detect_kind(raw) == "prompt"
        assert to_kind_record(raw, "r.jsonl:1") == {"prompt": USER, **({"id": 7} if "id" in raw else {})}
    # A prompt beside an answer-like field is an SFT record to map with --columns, as before.
    assert detect_kind({"prompt": Q, "response": GOOD}) == detect_kind(chat(Q, GOOD)) == "sft"


BAD_RECORDS = [
    ({"prompt": Q, "chosen": GOOD}, "the pair has 'chosen' but no 'rejected'"),
    ({"prompt": Q, "rejected": BAD}, "the pair has 'rejected' but no 'chosen'"),
    ({"prompt": Q, "chosen": " \n", "rejected": BAD}, "'chosen' is empty or whitespace"),
    ({"prompt": Q, "chosen": GOOD, "rejected": [_assistant("")]}, "'rejected' is empty or whitespace"),
    ({"prompt": Q, "chosen": GOOD, "rejected": f"  {GOOD}\n"}, "'chosen' and 'rejected' are the same text"),
    ({"prompt": Q, "completion": GOOD, "label": "yes"}, "'label' must be true or false (a JSON boolean), got \"yes\""),
    ({"instruction": Q, "output": GOOD, "kto_tag": 1}, "'kto_tag' must be true or false (a JSON boolean), got 1"),
    ({"chosen": GOOD, "rejected": BAD}, "the pair has no prompt"),
    (
        {"chosen": [*USER, _assistant(GOOD)], "rejected": [_user("Other?"), _assistant(BAD)]},
        "'chosen' and 'rejected' differ before their last message",
    ),
    ({"prompt": [*USER, _assistant("x")], "chosen": GOOD, "rejected": BAD}, "the prompt's last message is from"),
    ({"prompt": Q, "chosen": [_assistant(GOOD), _assistant(BAD)], "rejected": BAD}, "'chosen' holds 2 messages"),
    ({"prompt": Q, "chosen": _user(GOOD), "rejected": BAD}, "'chosen' is a message from 'user'"),
    ({"prompt": " "}, "user message 0 is empty or whitespace"),
]


@pytest.mark.parametrize("raw, problem", BAD_RECORDS)
def test_each_bad_record_is_one_line_naming_file_and_line(raw, problem):
    with pytest.raises(UserError) as err:
        to_kind_record(raw, "p.jsonl:3")
    message = str(err.value)
    assert message.startswith("p.jsonl:3: ") and problem in message and "\n" not in message


def test_validate_lists_each_bad_pair_and_the_leakage(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [PAIR, {"prompt": Q, "chosen": GOOD}, {"prompt": "Other?", "chosen": "x", "rejected": " x "}, PAIR]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken\n")
    held = write_jsonl(tmp_path / "e.jsonl", [{"prompt": Q.upper(), "chosen": "a", "rejected": "b"}])
    report = validate_file(path, eval_path=held)
    assert not report.ok and report.records == 5
    assert report.errors == [
        f"{path}:2: the pair has 'chosen' but no 'rejected'; a preference pair needs both answers to one prompt "
        f"(chosen: the better, rejected: the worse)",
        f"{path}:3: 'chosen' and 'rejected' are the same text; a pair teaches nothing without a difference "
        f"(fix or remove it)",
        f"{path}:5: malformed JSON (Expecting property name enclosed in double quotes at column 2); "
        f"each line must be one JSON object",
        f"{held}:1: the same prompt is in {path}:1 (train/holdout leakage inflates the evaluation)",
    ]
    assert any("1 duplicate record(s)" in w and "repeats line 1" in w for w in report.warnings)


def test_validate_checks_lengths_against_max_seq_len(tmp_path, tokenizer):
    long = " ".join(["word"] * 80)
    records = [PAIR, {"prompt": " ".join(["context"] * 60), "chosen": GOOD, "rejected": BAD}]
    records.append({"prompt": "Short?", "chosen": long, "rejected": BAD})
    path = write_jsonl(tmp_path / "p.jsonl", records)
    report = validate_file(path, tokenizer, 48)
    assert report.ok and "tokens" in report.stats, report.format()
    cut, dropped = report.warnings[-2:]
    assert "1 of 3 records exceed max_seq_len 48 tokens (prompt + the longer answer)" in cut and f"{path}:2" in cut
    assert "1 of 3 records would be dropped" in dropped and f"{path}:3" in dropped


def test_a_file_of_mixed_kinds_stops_at_the_first_record_of_the_other_kind(tmp_path, capsys):
    from qlora_platform.cli import main

    path = write_jsonl(tmp_path / "m.jsonl", [PAIR, PAIR, {"prompt": Q, "completion": GOOD, "label": False}])
    expected = f"{path}:3: a KTO record among preference pairs (the first is {path}:1)"
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        prepare([str(path)], out_dir=tmp_path / "o", skip_invalid=True)
    with pytest.raises(UserError, match="a KTO record among preference pairs"):
        validate_file(path)
    assert main(["validate", str(path), "--no-tokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {expected}") and "Traceback" not in err
    with pytest.raises(UserError, match=r"m.jsonl:1: a preference pair among SFT records \(the first is the --sample"):
        prepare([str(path)], out_dir=tmp_path / "o", sample=True)


def test_prepare_writes_a_split_with_no_prompt_on_both_sides(tmp_path):
    # 20 prompts with three pairs each: a prompt's pairs must all land on one side.
    pairs = [
        {"prompt": f"Question {i}?", "chosen": f"Right answer {i}.", "rejected": f"Wrong answer {i} {j}."}
        for i in range(20)
        for j in range(3)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", [*pairs, pairs[0]])
    report = prepare([str(path)], out_dir=tmp_path / "out", eval_ratio=0.2, seed=5)
    assert report["kind"] == "preference" and report["duplicates_dropped"] == 1
    assert (report["train"], report["eval"]) == (48, 12)
    assert "wrote 60 preference pairs" in format_report(report)
    train, held = _lines(tmp_path / "out" / "train.jsonl"), _lines(tmp_path / "out" / "eval.jsonl")
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in train + held)
    held_prompts = {normalise_key(prompt_text(r)) for r in held}
    assert len(held_prompts) == 4 and not held_prompts & {normalise_key(prompt_text(r)) for r in train}
    assert validate_file(tmp_path / "out" / "train.jsonl", eval_path=tmp_path / "out" / "eval.jsonl").ok
    assert load_kind_records(str(tmp_path / "out" / "train.jsonl"), "train_file", "preference") == train
    with pytest.raises(UserError, match="holds preference pairs; this run needs KTO records"):
        load_kind_records(str(tmp_path / "out" / "train.jsonl"), "train_file", "kto")


def test_prepare_writes_kto_and_prompt_only_files(tmp_path):
    kto = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0} for i in range(10)]
    report = prepare([str(write_jsonl(tmp_path / "k.jsonl", kto))], out_dir=tmp_path / "k", eval_ratio=0.2)
    assert report["kind"] == "kto" and (report["train"], report["eval"]) == (8, 2)
    assert _lines(tmp_path / "k" / "eval.jsonl")[0].keys() == {"prompt", "completion", "label"}
    prompts = [{"prompt": f"Write a haiku about {w}."} for w in ("rain", "snow", "wind", "sun")]
    report = prepare([str(write_jsonl(tmp_path / "r.jsonl", prompts))], out_dir=tmp_path / "r", eval_ratio=0)
    assert report["kind"] == "prompt" and report["avg_answer_words"] is None
    assert _lines(tmp_path / "r" / "train.jsonl")[0] == {"prompt": [_user("Write a haiku about rain.")]}
    assert "average" not in format_report(report) and "warning" not in format_report(report)


def test_sample_preferences_are_many_distinct_and_seeded():
    train, held = build_sample_preferences()
    pairs = train + held
    assert len(pairs) >= 300
    assert build_sample_preferences() == (train, held)
    assert all(normalise_key(p["chosen"]) != normalise_key(p["rejected"]) for p in pairs)
    assert all(to_kind_record(p, "sample") == p for p in pairs)
    assert len({normalise_key(prompt_text(p)) for p in pairs}) == len(pairs)
    assert build_sample_preferences(seed=7) != (train, held)
    # An object's wrong answer names the asked object and documents another one of its module.
    loads = next(p for p in pairs if "`json.loads`" in p["prompt"][-1]["content"])
    assert "\n\nSignature: `json.loads(" in loads["rejected"] and loads["rejected"] != loads["chosen"]
    assert len(held) > 100 and not {prompt_text(r) for r in held} & {prompt_text(r) for r in train}
    # No holdout answer, right or wrong, is an answer of a training pair: nothing teaches against it.
    train_answers = {normalise_key(a) for r in train for a in (r["chosen"], r["rejected"])}
    assert not {normalise_key(a) for r in held for a in (r["chosen"], r["rejected"])} & train_answers


def test_prepare_sample_preferences_through_the_cli_is_deterministic(tmp_path, capsys):
    from qlora_platform.cli import main

    assert main(["prepare", "--sample-preferences", "--out-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "preference pairs" in out and "holdout" in out
    assert main(["prepare", "--sample-preferences", "--out-dir", str(tmp_path / "b")]) == 0
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, held = _lines(tmp_path / "a" / "train.jsonl"), _lines(tmp_path / "a" / "eval.jsonl")
    assert len(train) + len(held) >= 300 and len(held) > 0
    assert not {prompt_text(r) for r in held} & {prompt_text(r) for r in train}
    assert main(["prepare", "--sample", "--sample-preferences", "--out-dir", str(tmp_path / "c")]) == 2
    assert "separate data sets; one run writes one of them" in capsys.readouterr().err


def test_validate_on_a_bad_pair_file_through_the_cli(tmp_path, capsys):
    from qlora_platform.cli import main

    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, {"prompt": Q, "chosen": GOOD}])
    assert main(["validate", str(path), "--no-tokenizer"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.out.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {path}:2: the pair has 'chosen' but no 'rejected'; a preference pair needs both answers to "
        f"one prompt (chosen: the better, rejected: the worse)"
    ]
    assert "Traceback" not in captured.out + captured.err and captured.out.strip().endswith("FAILED: 1 error(s)")


def _labelled(tokenizer, ids, labels):
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def test_encode_pair_labels_the_answers_only_after_shared_prompt_ids(tokenizer):
    system = {"role": "system", "content": "Be brief."}
    record = {"prompt": [system, *USER], "chosen": GOOD, "rejected": BAD}
    ex = encode_pair(tokenizer, record, 256)
    prompt = ex["prompt_input_ids"]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n") and not ex["truncated"]
    for side, answer in (("chosen", GOOD), ("rejected", BAD)):
        ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :] and labels[-1] == tokenizer.eos_token_id
        assert _labelled(tokenizer, ids, labels) == f"{answer}<|im_end|>"
    # The chosen side is what SFT tokenization makes of the same conversation.
    sft = encode_record(tokenizer, {"messages": [system, *USER, _assistant(GOOD)]}, 256)
    assert sft["input_ids"][: len(ex["chosen_input_ids"])] == ex["chosen_input_ids"]
    assert [lab for lab in sft["labels"] if lab != IGNORE] == [lab for lab in ex["chosen_labels"] if lab != IGNORE]


def test_encode_pair_cuts_the_prompt_from_the_left_and_drops_what_cannot_fit(tokenizer):
    record = {"prompt": [_user(" ".join(["context"] * 40) + " " + Q)], "chosen": GOOD, "rejected": BAD}
    whole = encode_pair(tokenizer, record, 512)
    answer = max(len(whole["chosen_input_ids"]), len(whole["rejected_input_ids"])) - len(whole["prompt_input_ids"])
    ex = encode_pair(tokenizer, record, answer + 10)
    assert ex["truncated"] and ex["length"] == whole["length"]
    assert ex["prompt_input_ids"] == whole["prompt_input_ids"][-10:]
    assert max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) == answer + 10
    assert encode_pair(tokenizer, record, answer) is None
    long = {**PAIR, "chosen": " ".join(["word"] * 80)}
    kept, dropped = encode_pairs(tokenizer, [long, PAIR], 64)
    assert dropped == 1 and kept == [encode_pair(tokenizer, PAIR, 64)] and not kept[0]["truncated"]


def test_kto_and_prompt_records_encode_like_pairs(tokenizer):
    kto = encode_kto(tokenizer, {"prompt": USER, "completion": GOOD, "label": False}, 256)
    pair = encode_pair(tokenizer, PAIR, 256)
    assert kto["prompt_input_ids"] == pair["prompt_input_ids"] and kto["label"] is False
    assert kto["completion_input_ids"] == pair["chosen_input_ids"] and kto["completion_labels"] == pair["chosen_labels"]
    ex = encode_prompt(tokenizer, {"prompt": USER}, 5)
    assert ex["truncated"] and ex["prompt_input_ids"] == pair["prompt_input_ids"][-5:]
