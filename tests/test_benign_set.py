"""The packaged benign instruction set, its loader's checks and the seeded stratified split."""

import collections
import json

import pytest

from harmjax.data import DatasetFormatError, Example
from harmjax.data.benign_set import CATEGORIES, load_benign_instructions, split_benign
from harmjax.errors import MissingFileError


def test_packaged_set_loads_with_all_categories():
    examples = load_benign_instructions()
    assert len(examples) >= 120
    assert all(isinstance(ex, Example) and ex.response == "" for ex in examples)
    counts = collections.Counter(ex.category for ex in examples)
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= 15, counts
    ids = [ex.id for ex in examples]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "benign-000"
    normalized = [" ".join(ex.prompt.lower().split()) for ex in examples]
    assert len(set(normalized)) == len(normalized)
    assert all(3 <= len(ex.prompt.split()) <= 60 for ex in examples)


def test_loader_reads_a_user_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"id": "a", "category": "facts", "instruction": "Name a moon of Mars.", "note": "extra ok"}\n'
        "\n"
        '{"id": "b", "category": "maths", "instruction": "What is 2 + 2?"}\n'
    )
    assert load_benign_instructions(str(path)) == [
        Example("Name a moon of Mars.", "", "facts", "a"),
        Example("What is 2 + 2?", "", "maths", "b"),
    ]


GOOD = '{"id": "a", "category": "facts", "instruction": "Name a moon of Mars."}'


@pytest.mark.parametrize(
    "second_line, message",
    [
        ("{not json", r"line 2: not valid JSON"),
        ('["a list"]', r"line 2: expected a JSON object, got list"),
        ('{"id": "b", "category": "facts"}', r"line 2: field 'instruction' must be a non-empty string"),
        ('{"id": "b", "category": "  ", "instruction": "Hi there?"}', r"line 2: field 'category'"),
        ('{"id": 7, "category": "facts", "instruction": "Hi there?"}', r"line 2: field 'id'"),
        ('{"id": "a", "category": "maths", "instruction": "What is 3 + 4?"}', r"line 2: id 'a' already used on line 1"),
        ('{"id": "b", "category": "maths", "instruction": "name a  MOON of mars."}',
         r"line 2: instruction repeats the one on line 1"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, second_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + second_line + "\n")
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl, " + message):
        load_benign_instructions(str(path))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(MissingFileError, match="nope.jsonl"):
        load_benign_instructions(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetFormatError, match="empty.jsonl: no instructions"):
        load_benign_instructions(str(empty))


def test_split_is_deterministic_disjoint_and_stratified():
    examples = load_benign_instructions()
    retain, heldout = split_benign(examples, 0.2, seed=3)
    again = split_benign(examples, 0.2, seed=3)
    assert (retain, heldout) == again
    assert {ex.id for ex in retain}.isdisjoint({ex.id for ex in heldout})
    assert sorted(ex.id for ex in retain + heldout) == sorted(ex.id for ex in examples)
    # Input order is kept in both halves.
    position = {ex.id: i for i, ex in enumerate(examples)}
    assert [position[ex.id] for ex in heldout] == sorted(position[ex.id] for ex in heldout)
    totals = collections.Counter(ex.category for ex in examples)
    held = collections.Counter(ex.category for ex in heldout)
    for category, n in totals.items():
        assert held[category] == round(0.2 * n), (category, held[category], n)
    other_seed = split_benign(examples, 0.2, seed=4)[1]
    assert {ex.id for ex in other_seed} != {ex.id for ex in heldout}


def test_split_category_is_independent_of_other_categories():
    examples = load_benign_instructions()
    facts_only = [ex for ex in examples if ex.category == "facts"]
    held_all = [ex for ex in split_benign(examples, 0.3, seed=0)[1] if ex.category == "facts"]
    assert split_benign(facts_only, 0.3, seed=0)[1] == held_all


def test_split_edge_cases():
    tiny = [Example(f"p{i}", "", "c", str(i)) for i in range(3)] + [Example("solo", "", "d", "s")]
    retain, heldout = split_benign(tiny, 0.01, seed=0)
    assert len([ex for ex in heldout if ex.category == "c"]) == 1  # at least one held out
    assert [ex.id for ex in retain if ex.category == "d"] == ["s"]  # a single example stays in retain
    retain, heldout = split_benign(tiny, 0.99, seed=0)
    assert len([ex for ex in retain if ex.category == "c"]) == 1  # at least one kept for retain
    assert split_benign(tiny, 0.0, seed=0) == (tiny, [])
    assert split_benign(tiny, 1.0, seed=0) == ([], tiny)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_benign(tiny, 1.5, seed=0)


def test_package_file_is_plain_jsonl_in_id_order():
    # The file itself (what the README documents): ids benign-000.. in order, three fields.
    import importlib.resources

    text = importlib.resources.files("harmjax.data").joinpath("benign", "instructions.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows] == [f"benign-{i:03d}" for i in range(len(rows))]
    assert all(set(r) == {"id", "category", "instruction"} for r in rows)
