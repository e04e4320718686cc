import json

import pytest

from qlora_platform.data.formats import normalise_key, prompt_of
from qlora_platform.data.prepare import format_report, prepare
from qlora_platform.data.sample import build_sample_records
from qlora_platform.data.split import split_holdout
from qlora_platform.errors import UserError
from tests.conftest import chat, write_jsonl


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_mixed_inputs_dedupes_and_splits(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "a.jsonl", [chat(f"q{i}", f"answer {i}") for i in range(30)] + [chat("q1", "answer 1")]
    )
    csv = tmp_path / "b.csv"
    csv.write_text("question,answer\n" + "".join(f"c{i},reply {i}\n" for i in range(10)))
    report = prepare([str(jsonl)], out_dir=tmp_path / "out", eval_ratio=0.2, seed=1)
    assert report["duplicates_dropped"] == 1 and report["written"] == 30
    assert (report["train"], report["eval"]) == (24, 6)
    with pytest.raises(UserError, match="not in the CSV header"):  # a CSV needs instruction/output columns
        prepare([str(jsonl), str(csv)], out_dir=tmp_path / "out2")


def test_prepare_csv_needs_mapping(tmp_path):
    csv = tmp_path / "b.csv"
    csv.write_text("question,answer\nc,reply\n")
    with pytest.raises(UserError, match="--columns"):
        prepare([str(csv)], out_dir=tmp_path / "o")
    report = prepare(
        [str(csv)], out_dir=tmp_path / "o", mapping={"instruction": "question", "output": "answer"}, eval_ratio=0
    )
    assert report["written"] == 1 and report["eval_file"] is None


def test_bad_record_stops_with_line_unless_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps(chat("q", "a"))
        + "\n"
        + json.dumps({"instruction": "q2", "output": " "})
        + "\n"
        + json.dumps({"instruction": "q3"})
        + "\n"
    )
    with pytest.raises(UserError, match=r"a.jsonl:2: .*empty.*--skip-invalid"):
        prepare([str(path)], out_dir=tmp_path / "o")
    report = prepare([str(path)], out_dir=tmp_path / "o", skip_invalid=True, eval_ratio=0)
    assert report["invalid_dropped"] == 2 and report["written"] == 1
    assert len(report["invalid_examples"]) == 2


def test_split_keeps_same_prompt_on_one_side_and_stratifies():
    records = [chat(f"question {i % 40}", f"answer {i}", category="ab"[i % 2]) for i in range(200)]
    train, held = split_holdout(records, ratio=0.1, seed=3)
    assert 15 <= len(held) <= 25 and len(train) + len(held) == 200
    held_prompts = {normalise_key(prompt_of(r)) for r in held}
    assert not held_prompts & {normalise_key(prompt_of(r)) for r in train}
    assert {r["category"] for r in held} == {"a", "b"}
    assert split_holdout(records, 0.1, seed=3) == (train, held)  # seeded


def test_sample_dataset_is_large_long_and_unique():
    records = build_sample_records()
    assert len(records) >= 1000
    answers = [r["messages"][-1]["content"] for r in records]
    assert sum(len(a.split()) for a in answers) / len(answers) > 50
    assert len({normalise_key(r["messages"][1]["content"]) for r in records}) == len(records)
    assert len({normalise_key(a) for a in answers}) == len(records)


def test_skip_invalid_skips_and_counts_a_malformed_json_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n{broken\n" + json.dumps(chat("q2", "a2")) + "\n")
    with pytest.raises(UserError, match=r"a.jsonl:2: malformed JSON.*--skip-invalid"):
        prepare([str(path)], out_dir=tmp_path / "o")
    report = prepare([str(path)], out_dir=tmp_path / "o", skip_invalid=True, eval_ratio=0)
    assert report["invalid_dropped"] == 1 and report["written"] == 2
    assert "a.jsonl:2: malformed JSON" in report["invalid_examples"][0]
    assert "e.g." in format_report(report) and "a.jsonl:2" in format_report(report)


def test_nothing_valid_left_says_why_in_one_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("{broken\n" + json.dumps({"instruction": "q3"}) + "\n")
    with pytest.raises(UserError) as err:
        prepare([str(path)], out_dir=tmp_path / "o", skip_invalid=True)
    message = str(err.value)
    assert "see the errors above" not in message and "\n" not in message
    assert "all 2 records were invalid" in message and "a.jsonl:1: malformed JSON" in message
    assert "a.jsonl:2: missing field 'output'" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="hold no records"):
        prepare([str(empty)], out_dir=tmp_path / "o")


def test_unknown_json_records_get_the_columns_hint(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "a?", "response": "b."}]))
    with pytest.raises(
        UserError,
        match=r"pairs.json\[0\]: unknown record format \(keys: prompt, response\); "
        r"map its fields with --columns instruction=prompt,output=response",
    ):
        prepare([str(path)], out_dir=tmp_path / "o")
    report = prepare([str(path)], out_dir=tmp_path / "o", mapping={"instruction": "prompt", "output": "response"})
    assert report["written"] == 1


def test_no_holdout_removes_the_stale_eval_file_of_an_earlier_run(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"answer {i}") for i in range(20)])
    out = tmp_path / "out"
    first = prepare([str(path)], out_dir=out, eval_ratio=0.2)
    assert first["eval"] == 4 and (out / "eval.jsonl").is_file()
    report = prepare([str(path)], out_dir=out, eval_ratio=0)
    assert not (out / "eval.jsonl").exists()
    assert report["removed_stale"] == [str(out / "eval.jsonl")] and report["train"] == 20
    assert f"removed {out / 'eval.jsonl'}" in format_report(report)


def test_no_holdout_refuses_an_eval_file_it_did_not_write(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"answer {i}") for i in range(5)])
    out = tmp_path / "out"
    out.mkdir()
    mine = write_jsonl(out / "eval.jsonl", [chat("hand written", "holdout")])
    with pytest.raises(UserError, match="not written by qlora prepare"):
        prepare([str(path)], out_dir=out, eval_ratio=0)
    assert json.loads(mine.read_text())["messages"][0]["content"] == "hand written"
    assert not (out / "train.jsonl").exists()


def test_a_folder_mixing_markdown_csv_and_jsonl_uses_every_file(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    body = " ".join(["Widgets are configured by editing the settings file and restarting."] * 3)
    (folder / "guide.md").write_text(f"# Widget Guide\n\n## Install\n\n{body}\n")
    (folder / "faq.csv").write_text("instruction,output\nWhat is a widget?,A small part.\n")
    write_jsonl(folder / "more.jsonl", [chat("Why widgets?", "Because.")])
    (folder / ".hidden.jsonl").write_text("{broken\n")
    report = prepare([str(folder)], out_dir=tmp_path / "out", eval_ratio=0)
    assert report["written"] == 3
    prompts = {r["messages"][0]["content"] for r in _lines(tmp_path / "out" / "train.jsonl")}
    assert prompts == {"Widget Guide: explain 'Install'.", "What is a widget?", "Why widgets?"}
