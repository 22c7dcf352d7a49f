"""VQA scoring: the official normalisation and accuracy, exact match, multiple choice."""

from __future__ import annotations

import pytest

from data import CORRECT_THRESHOLD, extract_choice, is_correct, normalize_answer, score


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("two", "2"),
        ("Ten", "10"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dog.", "dog"),
        ("yes!", "yes"),
        ("red, white", "red white"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("  top left\n", "top left"),
        ("1,000", "1000"),
    ],
)
def test_vqa_normalisation_makes_equivalent_answers_match(prediction, gold):
    assert normalize_answer(prediction) == normalize_answer(gold)
    assert score(prediction, [gold]) == 1.0
    assert score(prediction, [gold], metric="exact") == 1.0


def test_normalisation_keeps_what_the_official_script_keeps():
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("dog") != normalize_answer("dogs")
    assert normalize_answer("none") == "0"
    assert score("cat", ["dog"]) == 0.0


def test_vqa_accuracy_with_ten_annotators_is_the_official_formula():
    gold = ["2"] * 2 + ["3"] * 8
    assert score("2", gold) == pytest.approx(0.6)
    assert score("two", gold) == pytest.approx(0.6)
    assert score("3", gold) == pytest.approx(1.0)
    assert score("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert score("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert score("4", gold) == 0.0


def test_few_gold_answers_mean_a_match_against_any():
    assert score("dog", ["dog"]) == 1.0
    assert score("dog", ["cat", "a dog"]) == 1.0
    assert score("dog", ["cat", "cow"]) == 0.0
    assert score("dog", "dog") == 1.0
    assert score("dog", []) == 0.0


def test_is_correct_uses_the_documented_threshold():
    assert CORRECT_THRESHOLD == 0.5
    assert is_correct("2", ["2"] * 2 + ["3"] * 8)  # 0.6
    assert not is_correct("2", ["2"] + ["3"] * 9)  # 0.3
    assert is_correct("Two.", ["2"])
    assert not is_correct("B", ["C"], metric="mc")


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (B).", "B"),
        ("B. dog", "B"),
        ("b", "B"),
        ("(c)", "C"),
        ("D", "D"),
        ("A", "A"),
        ("I think the answer is C because it is red.", "C"),
        ("Answer: E", "E"),
        ("It must be option D", "D"),
        ("The dog on the left (A) is larger.", "A"),
        ("A dog", None),
        ("the answer is a dog", None),
        ("no idea", None),
    ],
)
def test_multiple_choice_letter_extraction(text, letter):
    assert extract_choice(text) == letter


def test_multiple_choice_scoring():
    assert score("The answer is (B).", ["B"], metric="mc") == 1.0
    assert score("b", ["(B)"], metric="mc") == 1.0
    assert score("C. a cat", ["B"], metric="mc") == 0.0
    assert score("A dog", ["A"], metric="mc") == 0.0


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError):
        score("a", ["a"], metric="bleu")
