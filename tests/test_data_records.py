"""Records, calibration tokenization and JSONL storage: malformed input is named, never silently
scored; truncation keeps the response; a killed writer's partial line is dropped on resume."""

import json

import numpy as np
import pytest

from harmjax.data.calibration import calibration_batches, tokenize_example
from harmjax.data.records import DatasetFormatError, Example, filter_categories, read_records, sample, to_examples
from harmjax.errors import MissingFileError
from harmjax.io.jsonl import JsonlFormatError, JsonlWriter, read_jsonl
from tests.hf_reference import tiny_tokenizer


def test_read_records_formats_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,response\nhi,there\n\"multi\nline\",ok\n")
    assert read_records(str(tmp_path / "a.csv")) == [
        {"prompt": "hi", "response": "there"}, {"prompt": "multi\nline", "response": "ok"}]
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"prompt": "p", "response": "r"}]}))
    assert read_records(str(tmp_path / "b.json")) == [{"prompt": "p", "response": "r"}]
    (tmp_path / "bad.csv").write_text("prompt,response\na,b,c\n")
    with pytest.raises(DatasetFormatError, match="line 2: more cells than header columns"):
        read_records(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DatasetFormatError, match="line 2: expected a JSON object"):
        read_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(MissingFileError, match="No dataset file"):
        read_records(str(tmp_path / "missing.csv"))


def test_to_examples_errors_or_skips_and_counts():
    rows = [{"prompt": "a", "response": "x", "cat": "A"}, {"prompt": "b", "response": "", "cat": "B"},
            {"prompt": "", "response": "y", "cat": "A"}, {"prompt": "c", "response": float("nan"), "cat": "B"}]
    with pytest.raises(DatasetFormatError, match="rows.csv, row 1: empty or missing 'response'"):
        to_examples(rows, category_key="cat", source="rows.csv")
    examples, skipped = to_examples(rows, category_key="cat", on_bad="skip")
    assert skipped == 3 and examples == [Example("a", "x", "A", "0")]
    with pytest.raises(DatasetFormatError, match="no column 'answer'"):
        to_examples(rows, response_key="answer")
    many = [Example(str(i), "r", "A" if i % 2 else "B") for i in range(10)]
    assert [e.prompt for e in filter_categories(many, exclude=["b"])] == ["1", "3", "5", "7", "9"]
    assert sample(many, 4, seed=0) == sample(many, 4, seed=0) != sample(many, 4, seed=1)
    assert sorted(e.prompt for e in sample(many, None, seed=3)) == sorted(e.prompt for e in many)


def test_truncation_keeps_the_response_and_masks_only_it():
    tok = tiny_tokenizer()
    ex = Example("p" * 50, "R" * 30)
    full = tokenize_example(tok, ex, "raw", max_length=128)
    assert len(full.ids) == 81 and full.loss_mask.sum() == 30
    assert tok.decode(full.ids[full.loss_mask == 1]) == "R" * 30
    short = tokenize_example(tok, ex, "raw", max_length=20)
    # 19 response tokens survive behind one context token (the "\n" before the response).
    assert len(short.ids) == 20 and tok.decode(short.ids) == "\n" + "R" * 19
    np.testing.assert_array_equal(short.loss_mask, [0] + [1] * 19)
    chat = tokenize_example(tok, Example("Hi?", "Yes."), "chat", max_length=128)
    assert tok.decode(chat.ids[chat.loss_mask == 1]).startswith("Yes.</s>")
    assert tok.decode(chat.ids[chat.loss_mask == 0]).endswith("<s>assistant\n")


def test_batches_bucket_pad_and_index():
    tok = tiny_tokenizer()
    examples = [Example("a", "b" * n) for n in (3, 100, 10, 40)]
    batches = calibration_batches(tok, examples, batch_size=2, max_length=256)
    assert sorted({b.input_ids.shape[1] for b in batches}) == [32, 64, 128]
    seen = sorted(int(i) for b in batches for i in b.index if i >= 0)
    assert seen == [0, 1, 2, 3]
    for b in batches:
        filler = b.index < 0
        assert not b.loss_mask[filler].any() and not b.attention_mask[filler].any()
        assert (b.loss_mask <= b.attention_mask).all()


def test_jsonl_resume_drops_a_truncated_line(tmp_path):
    path = str(tmp_path / "out.jsonl")
    with JsonlWriter(path) as out:
        out.write({"id": "a", "v": 1})
        out.write({"id": "b", "v": 2})
    with open(path, "a") as f:
        f.write('{"id": "c", "v"')  # a kill in mid-write
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    with JsonlWriter(path) as out:
        assert out.done == {"a", "b"}
        out.write({"id": "c", "v": 3})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    with open(path, "a") as f:
        f.write("not json\n")
    with pytest.raises(JsonlFormatError, match="line 4: not valid JSON"):
        read_jsonl(path)
