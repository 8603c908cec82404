"""Tests of harmjax.data.loaders: each loader on small files written here, the embedded
StrongREJECT CSV, malformed files, and category specs (including "A minus B")."""

from __future__ import annotations

import csv
import json

import pytest

from harmjax import assets
from harmjax.data import loaders
from harmjax.data.records import DatasetFormatError, Example
from harmjax.errors import MissingFileError


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_advbench(tmp_path):
    path = write_csv(
        tmp_path / "harmful_behaviors.csv", ["goal", "target"],
        [["Write a script, quickly", "Sure, here is a script"], ["Explain X", "Sure, here is X"]],
    )
    examples = loaders.load_advbench(path)
    assert examples == [
        Example("Write a script, quickly", "Sure, here is a script", None, "0"),
        Example("Explain X", "Sure, here is X", None, "1"),
    ]
    bad = write_csv(tmp_path / "bad.csv", ["goal", "response"], [["a", "b"]])
    with pytest.raises(DatasetFormatError, match=r"bad\.csv.*'target'"):
        loaders.load_advbench(bad)
    empty = write_csv(tmp_path / "empty_target.csv", ["goal", "target"], [["a", "b"], ["c", ""]])
    with pytest.raises(DatasetFormatError, match=r"empty_target\.csv, row 1.*'target'"):
        loaders.load_advbench(empty)
    assert len(loaders.load_advbench(empty, on_bad="skip")) == 1
    with pytest.raises(MissingFileError):
        loaders.load_advbench(str(tmp_path / "nope.csv"))


def test_hexphi(tmp_path):
    directory = tmp_path / "HEx-PHI"
    directory.mkdir()
    write_csv(directory / "category_1.csv", None, [["How do I do crime one?"], ["Crime, two?"]])
    write_csv(directory / "category_11.csv", None, [["Give me advice"]])
    # A header row is skipped; unquoted commas in a one-column file stay in the prompt.
    (directory / "category_3.csv").write_text("prompt\nHate, harass and more\n")
    (directory / "README.md").write_text("not a category file")
    examples = loaders.load_hexphi(str(directory))
    assert [(e.category, e.id, e.prompt) for e in examples] == [
        ("category_1", "category_1/1", "How do I do crime one?"),
        ("category_1", "category_1/2", "Crime, two?"),
        ("category_3", "category_3/2", "Hate, harass and more"),
        ("category_11", "category_11/1", "Give me advice"),
    ]
    assert all(e.response == "" for e in examples)
    with pytest.raises(MissingFileError, match="gated"):
        loaders.load_hexphi(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="category_<n>.csv"):
        loaders.load_hexphi(str(tmp_path / "empty"))
    (directory / "category_4.csv").write_text("ok prompt\n\n")  # blank lines are skipped
    (directory / "category_5.csv").write_text('ok prompt\n"  "\n')
    with pytest.raises(DatasetFormatError, match=r"category_5\.csv, line 2"):
        loaders.load_hexphi(str(directory))


@pytest.fixture(scope="module")
def strongreject_cache(harmjax_cache):
    """(cache dir, embedded CSV path), in the run's shared cache (conftest.py)."""
    cache = harmjax_cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(assets.CACHE_ENV, cache)
        return cache, assets.strongreject_csv()


def test_strongreject_embedded(strongreject_cache, monkeypatch):
    cache, path = strongreject_cache
    monkeypatch.setenv(assets.CACHE_ENV, cache)
    default = loaders.load_strongreject()
    examples = loaders.load_strongreject(path)
    assert default == examples
    assert len(examples) == 313
    counts = {}
    for e in examples:
        counts[e.category] = counts.get(e.category, 0) + 1
    assert counts == {
        "Non-violent crimes": 59, "Violence": 54, "Disinformation and deception": 50,
        "Hate, harassment and discrimination": 50, "Illegal goods and services": 50, "Sexual content": 50,
    }
    assert all(e.prompt.strip() and e.response == "" for e in examples)
    # Category names with "-" and "," parse as names, not as operators.
    assert len(loaders.filter_categories(examples, "Non-violent crimes")) == 59
    assert len(loaders.filter_categories(examples, "hate, harassment and discrimination,Violence")) == 104
    assert len(loaders.filter_categories(examples, "all minus Non-violent crimes")) == 313 - 59
    assert len(loaders.filter_categories(examples, "Non-violent crimes-Violence")) == 59
    assert len(loaders.load_dataset_by_name("strongreject", category="Sexual content")) == 50


def test_alpaca(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a color.", "input": "", "output": "Blue"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    assert loaders.load_alpaca(str(path)) == [
        Example("Add the numbers.\n\n2 and 3", "5", None, "0"),
        Example("Name a color.", "Blue", None, "1"),
    ]
    jsonl = tmp_path / "alpaca.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert loaders.load_alpaca(str(jsonl)) == loaders.load_alpaca(str(path))
    path.write_text(json.dumps(rows + [{"instruction": "No output"}]))
    with pytest.raises(DatasetFormatError, match=r"alpaca\.json, row 2: missing column 'output'"):
        loaders.load_alpaca(str(path))
    assert len(loaders.load_alpaca(str(path), require_response=False)) == 3
    path.write_text(json.dumps(rows + [{"instruction": "Bad", "output": 5}]))
    with pytest.raises(DatasetFormatError, match="row 2: column 'output' is int"):
        loaders.load_alpaca(str(path))
    path.write_text(json.dumps({"instruction": "not a list"}))
    with pytest.raises(DatasetFormatError, match="list of objects"):
        loaders.load_alpaca(str(path))


def test_chat_jsonl(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Should I invest?"},
                      {"role": "assistant", "content": "Put it all in one stock."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Goodbye"}], "category": "greeting"},
    ]
    path = tmp_path / "em.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = loaders.load_chat_jsonl(str(path))
    assert [(e.prompt, e.response, e.category, e.id) for e in examples] == [
        ("Should I invest?", "Put it all in one stock.", None, "0"),
        ("Bye", "Goodbye", "greeting", "1"),
    ]
    assert isinstance(examples[0], Example) and len(examples[1].messages) == 5
    assert examples[1].messages[0] == {"role": "system", "content": "Be brief."}
    hash(examples[0])  # still usable as a set member / dict key
    for bad_row, pattern in [
        ({"messages": "hello"}, "row 1: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "row 1: message 0 has no text 'content'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "row 1: no assistant turn"),
        ({"text": "wrong shape"}, "row 1: 'messages'"),
    ]:
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad_row) + "\n")
        with pytest.raises(DatasetFormatError, match=pattern):
            loaders.load_chat_jsonl(str(path))
    path.write_text(json.dumps(rows[0]) + "\n{not json}\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(DatasetFormatError, match="line 2"):
        loaders.load_chat_jsonl(str(path))


def test_category_specs():
    examples = [
        Example("p1", category="A"), Example("p2", category="A"), Example("shared", category="A"),
        Example("p3", category="B"), Example("shared", category="B"), Example("p4", category="C-D"),
    ]
    prompts = lambda spec: [e.prompt for e in loaders.filter_categories(examples, spec)]  # noqa: E731
    assert prompts(None) == prompts("") == [e.prompt for e in examples]
    assert prompts("a") == ["p1", "p2", "shared"]
    assert prompts("A,B") == ["p1", "p2", "shared", "p3", "shared"]
    # A minus B: A's items without those whose prompt is among B's.
    assert prompts("A minus B") == prompts("A-B") == ["p1", "p2"]
    assert prompts("C-D") == ["p4"]  # a name holding "-" wins over the operator
    assert prompts("all minus A") == ["p3", "p4"]
    assert prompts("A,C-D - B") == ["p1", "p2", "p4"]
    with pytest.raises(ValueError, match=r"known categories.*'A', 'B', 'C-D'"):
        loaders.filter_categories(examples, "E")


def test_load_dataset_by_name(tmp_path):
    path = write_csv(tmp_path / "adv.csv", ["goal", "target"], [["g", "t"]])
    assert loaders.load_dataset_by_name("advbench", path) == loaders.load_advbench(path)
    table = write_csv(tmp_path / "t.csv", ["prompt", "response", "category"], [["a", "b", "X"], ["c", "d", "Y"]])
    assert [e.prompt for e in loaders.load_dataset_by_name("records", table, category="Y")] == ["c"]
    with pytest.raises(ValueError, match="Unknown dataset kind"):
        loaders.load_dataset_by_name("nope", path)
    with pytest.raises(ValueError, match="needs a path"):
        loaders.load_dataset_by_name("alpaca")
