"""Presets: each benchmark release's layout, written as a tiny parquet file, loads into the
uniform samples with LLaVA's prompt and the gold answers; a row the preset cannot read is
recorded with its reason. Plus ANLS, ChartQA's relaxed accuracy and POPE's yes/no."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from data import anls, get_preset, load_samples, relaxed_accuracy, sample_meta, score, yes_no
from data.presets import MC_ANSWER, SHORT_ANSWER

SHORT = "\n" + SHORT_ANSWER


def _image(colour=(200, 20, 20)) -> Image.Image:
    return Image.new("RGB", (12, 10), colour)


IMG = _image()

CASES = {
    "textvqa": (
        [
            {"question_id": 7, "question": "what brand?", "answers": ["nike"] * 9 + ["adidas"],
             "image": IMG, "ocr_tokens": ["nike"]},
            {"question_id": 8, "question": "what year?", "answers": [], "image": IMG,
             "ocr_tokens": []},
        ],
        ("7", "what brand?" + SHORT, ["nike"] * 9 + ["adidas"]),
        {"8": "no_answers"},
    ),
    "docvqa": (
        [
            {"questionId": "q1", "question": "What is the total?", "answers": ["$1.00", "1.00"],
             "image": IMG, "docId": 3},
            {"questionId": "q2", "question": "Who signed?", "answers": [], "image": IMG,
             "docId": 3},
        ],
        ("q1", "What is the total?" + SHORT, ["$1.00", "1.00"]),
        {"q2": "no_answers"},
    ),
    "chartqa": (
        [
            {"type": "human_test", "question": "What is the peak?", "answer": "12", "image": IMG},
            {"type": "augmented_test", "question": "Which is lowest?", "answer": "", "image": IMG},
        ],
        ("row-0", "What is the peak?" + SHORT, ["12"]),
        {"row-1": "no_answers"},
    ),
    "vqav2": (
        [
            {"question_id": 11, "question": "How many dogs?", "image": IMG,
             "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i}
                         for i in range(1, 4)], "multiple_choice_answer": "2"},
            {"question_id": 12, "question": "", "image": IMG,
             "answers": [{"answer": "no", "answer_confidence": "yes", "answer_id": 1}],
             "multiple_choice_answer": "no"},
        ],
        ("11", "How many dogs?" + SHORT, ["2", "2", "2"]),
        {"12": "empty_question"},
    ),
    "pope": (
        [
            {"question_id": "p1", "question": "Is there a dog in the image?", "answer": "yes",
             "image": IMG, "category": "random"},
            {"question_id": "p2", "question": "Is there a cat in the image?", "answer": "no",
             "image": None, "category": "random"},
        ],
        ("p1", "Is there a dog in the image?" + SHORT, ["yes"]),
        {"p2": "missing_image"},
    ),
    "mmbench": (
        [
            {"index": 0, "question": "Which animal is shown?", "hint": "A farm photo.",
             "A": "cow", "B": "dog", "C": "cat", "D": None, "answer": "B", "image": IMG,
             "category": "recognition"},
            {"index": 1, "question": "Which colour?", "hint": None, "A": "red", "B": "blue",
             "C": "green", "D": None, "answer": "D", "image": IMG, "category": "attribute"},
        ],
        ("0", f"A farm photo.\nWhich animal is shown?\nA. cow\nB. dog\nC. cat\n{MC_ANSWER}",
         ["B"]),
        {"1": "answer_not_an_option"},
    ),
    "scienceqa": (
        [
            {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
             "hint": "Whales breathe air.", "image": IMG, "subject": "natural science"},
            {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 5, "hint": "",
             "image": IMG, "subject": "natural science"},
        ],
        ("row-0",
         f"Context: Whales breathe air.\nWhich is a mammal?\nA. frog\nB. whale\n{MC_ANSWER}",
         ["B"]),
        {"row-1": "answer_not_an_option"},
    ),
    "seed": (
        [
            {"question_id": "s1", "question": "What is on the table?", "choice_a": "a cup",
             "choice_b": "a book", "choice_c": "a lamp", "choice_d": "a phone", "answer": "C",
             "data_type": "image", "image": [IMG]},
            {"question_id": "s2", "question": "What happens next?", "choice_a": "run",
             "choice_b": "sit", "choice_c": "jump", "choice_d": "stop", "answer": "A",
             "data_type": "video", "image": [IMG, IMG]},
        ],
        ("s1", f"What is on the table?\nA. a cup\nB. a book\nC. a lamp\nD. a phone\n{MC_ANSWER}",
         ["C"]),
        {"s2": "unsupported_image"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_preset_loads_its_release_layout(name, tmp_path):
    rows, (first_id, prompt, answers), bad = CASES[name]
    path = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    result = load_samples(path, preset=name)
    assert {s.id: s.kind for s in result.skipped} == bad, result.summary()
    assert result.n_loaded == len(rows) - len(bad)
    sample = result.dataset[0]
    assert (sample["id"], sample["question"], sample["answers"]) == (first_id, prompt, answers)
    assert sample["image"].size == IMG.size
    meta = sample_meta(sample)
    assert meta["preset"] == name
    assert str(meta["raw_question"]) == rows[0]["question"]


def test_gqa_reads_image_files_named_by_image_id(tmp_path):
    (tmp_path / "images").mkdir()
    _image((10, 200, 10)).save(tmp_path / "images" / "n1.jpg")
    rows = [
        {"id": "g1", "imageId": "n1", "question": "Is the cup left?", "answer": "yes"},
        {"id": "g2", "imageId": "n2", "question": "Is it red?", "answer": "no"},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "testdev.parquet"))
    result = load_samples(tmp_path / "testdev.parquet", preset="gqa")
    assert result.dataset["id"] == ["g1"]
    assert result.dataset[0]["question"] == "Is the cup left?" + SHORT
    assert [(s.id, s.kind) for s in result.skipped] == [("g2", "missing_image")]


def test_a_missing_column_is_recorded_per_sample(tmp_path):
    rows = [{"question_id": i, "question": "what?", "image": IMG} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    result = load_samples(tmp_path / "t.parquet", preset="textvqa")
    assert result.n_loaded == 0
    assert [s.id for s in result.skipped] == ["0", "1", "2"]
    assert all(s.reason.startswith("missing_column: 'answers'") for s in result.skipped)


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'okvqa'"):
        load_samples(tmp_path, preset="okvqa")
    assert get_preset("docvqa").metric == "anls"


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Nike", ["nike"], 1.0),
        ("  nike   air ", ["Nike Air"], 1.0),
        ("nikes", ["nike"], 1 - 1 / 5),  # one insertion over 5 characters
        ("$1.0", ["$1.00", "1.00"], 1 - 1 / 5),  # best gold answer counts
        ("kitten", ["sitting"], 1 - 3 / 7),  # 3 edits over 7 characters: 0.57, kept
        ("abc", ["xyz"], 0.0),  # similarity 0 < 0.5
        ("", ["a"], 0.0),
    ],
)
def test_anls_by_hand(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)
    assert score(prediction, answers, "anls") == pytest.approx(expected)


def test_anls_threshold_zeroes_weak_matches():
    assert anls("abcdef", ["abcxyz"]) == pytest.approx(0.5)  # exactly at the threshold
    assert anls("abcdeg", ["abxyzq"]) == 0.0  # 4 of 6 wrong: 0.33


def test_relaxed_accuracy_and_yes_no():
    assert relaxed_accuracy("10.4", ["10"]) == 1.0  # 4 % off
    assert relaxed_accuracy("10.6", ["10"]) == 0.0  # 6 % off
    assert relaxed_accuracy("12%", ["0.12"]) == 1.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0  # a zero gold number needs equal text
    assert [yes_no(t) for t in ("Yes, there is.", "No.", "There is not a dog", "yes")] == [
        "yes",
        "no",
        "no",
        "yes",
    ]
    assert score("No, it is not.", ["no"], "yesno") == 1.0
    assert score("Yes. No dog.", ["yes"], "yesno") == 1.0  # only the first sentence counts
