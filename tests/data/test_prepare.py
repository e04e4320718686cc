import json

import pytest

from qlora_platform.data.formats import normalise_key, prompt_of
from qlora_platform.data.prepare import prepare
from qlora_platform.data.sample import build_sample_records
from qlora_platform.data.split import split_holdout
from qlora_platform.errors import UserError
from tests.conftest import chat, write_jsonl


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_mixed_inputs_dedupes_and_splits(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"answer {i}") for i in range(30)] + [chat("q1", "answer 1")])
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
    report = prepare([str(csv)], out_dir=tmp_path / "o", mapping={"instruction": "question", "output": "answer"},
                     eval_ratio=0)
    assert report["written"] == 1 and report["eval_file"] is None


def test_bad_record_stops_with_line_unless_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n" + json.dumps({"instruction": "q2", "output": " "}) + "\n"
                    + json.dumps({"instruction": "q3"}) + "\n")
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
