"""Preference data: the formats, and malformed files reported with their line and field."""

from __future__ import annotations

import pytest

from rewards.data import Comparison, load_preferences, save_preferences, split_by_prompt

PAIR = {"prompt": "the film was", "chosen": " good", "rejected": " bad"}


def test_pairs_levels_margins_and_rankings(write_jsonl):
    path = write_jsonl(
        [
            PAIR,
            {**PAIR, "chosen": " great", "level": "Significantly Better"},
            {**PAIR, "chosen": " fine", "level": "unsure", "margin": 0.25},
            {"prompt": "a", "responses": [" good", " fine", " bad"], "id": 7},  # extra fields are ignored
        ]
    )
    rows = load_preferences(path)
    assert [c.is_pair for c in rows] == [True, True, True, False]
    assert rows[0].chosen == " good" and rows[0].rejected == " bad" and rows[0].level is None
    assert rows[1].level == "significantly_better"
    assert (rows[2].level, rows[2].margin) == ("negligibly_better", 0.25)
    assert rows[3].responses == (" good", " fine", " bad")
    assert rows[3].where == f"{path}:4"


def test_save_and_load_round_trip(tmp_path):
    rows = [
        Comparison("p", (" a", " b"), level="better"),
        Comparison("q", (" a", " b", " c"), gold=(1.0, 0.5, 0.0)),
    ]
    save_preferences(rows, tmp_path / "out.jsonl")
    back = load_preferences(tmp_path / "out.jsonl")
    assert [(c.prompt, c.responses, c.level, c.margin) for c in back] == [
        (c.prompt, c.responses, c.level, c.margin) for c in rows
    ]


def test_datasets_dataset_is_accepted():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(
        [{**PAIR, "level": None}, {**PAIR, "chosen": " great", "level": "better"}]
    )
    rows = load_preferences(ds)
    assert [c.chosen for c in rows] == [" good", " great"]
    assert [c.level for c in rows] == [None, "better"]  # the column is None on the first row
    bad = datasets.Dataset.from_list([PAIR, {"prompt": "x", "chosen": " a", "rejected": " "}])
    with pytest.raises(ValueError, match=r"preference data row 1: field 'rejected' is empty"):
        load_preferences(bad)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "p", "chosen": " a"},
            r":2: missing field 'rejected' \(fields present: \['chosen', 'prompt'\]\)",
        ),
        ({"chosen": " a", "rejected": " b"}, r":2: missing field 'prompt'"),
        ({**PAIR, "chosen": "   "}, r":2: field 'chosen' is empty"),
        ({**PAIR, "prompt": ""}, r":2: field 'prompt' is empty"),
        ({**PAIR, "rejected": 3}, r":2: field 'rejected' must be a string, got int"),
        ({**PAIR, "level": "much better"}, r":2: field 'level': unknown preference level 'much better'"),
        ({**PAIR, "margin": "big"}, r":2: field 'margin' must be a finite number, got 'big'"),
        ({**PAIR, "margin": float("nan")}, r":2: field 'margin' must be a finite number"),
        ({**PAIR, "rejected": " good"}, r":2: field 'rejected' is identical to 'chosen'"),
        ({"prompt": "p", "responses": [" a"]}, r":2: field 'responses' needs at least 2 responses"),
        ({"prompt": "p", "responses": [" a", ""]}, r":2: field 'responses' item 1 is empty"),
        (
            {"prompt": "p", "responses": [" a", " b", " a"]},
            r":2: field 'responses' item 2 is identical to item 0",
        ),
        ({"prompt": "p", "responses": " a b"}, r":2: field 'responses' must be a list"),
        (
            {"prompt": "p", "responses": [" a", " b"], "level": "better"},
            r":2: a ranking row .* cannot also have",
        ),
        ('{"prompt": "p", "chosen": " a",', r":2: invalid JSON"),
        ("[1, 2]", r":2: expected a JSON object"),
    ],
)
def test_malformed_line_is_named_with_its_field(write_jsonl, row, message):
    other = {"prompt": "q", "chosen": " x", "rejected": " y"}
    path = write_jsonl([other, row])
    with pytest.raises(ValueError, match=message) as info:
        load_preferences(path)
    assert str(path) in str(info.value)


def test_duplicate_pair_names_both_lines(write_jsonl):
    path = write_jsonl([PAIR, {**PAIR, "chosen": " great"}, {**PAIR, "level": "better"}])
    with pytest.raises(ValueError, match=rf"{path}:3: duplicate of {path}:1"):
        load_preferences(path)
    # the reverse pair is a (noisy) label of its own, not a duplicate
    assert len(load_preferences([PAIR, {**PAIR, "chosen": " bad", "rejected": " good"}])) == 2


def test_comparison_objects_get_the_same_checks():
    rows = [
        Comparison("p", (" a", " b"), level="Better", gold=(1.0, 0.0)),
        Comparison("q", (" a", " b", " c")),
    ]
    loaded = load_preferences(rows)
    assert (
        loaded[0].level == "better"
        and loaded[0].gold == (1.0, 0.0)
        and loaded[1].where == "preference data row 1"
    )
    with pytest.raises(ValueError, match="preference data row 1: field 'rejected' is identical to 'chosen'"):
        load_preferences([rows[0], Comparison("p", (" a", " a"))])


def test_missing_and_empty_sources(tmp_path, write_jsonl):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="contains no comparisons"):
        load_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="preference data row 0: expected a mapping"):
        load_preferences(["the film was good"])


def test_split_by_prompt_is_seeded_and_keeps_prompts_together():
    rows = [Comparison(f"p{i % 10}", (f" a{i}", f" b{i}")) for i in range(40)]
    train, held = split_by_prompt(rows, 0.2, seed=3)
    assert {c.prompt for c in train}.isdisjoint({c.prompt for c in held})
    assert len({c.prompt for c in held}) == 2 and len(train) + len(held) == 40
    assert split_by_prompt(rows, 0.2, seed=3) == (train, held)
    assert split_by_prompt(rows, 0.0, seed=3) == (rows, [])
    with pytest.raises(ValueError, match="single prompt"):
        split_by_prompt(rows[:1], 0.5, seed=0)
