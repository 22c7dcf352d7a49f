"""Loaders: a round trip through every format on files the test writes, column mapping, and
bad input recorded with the sample id and a reason, never dropped silently."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data import (
    SAMPLE_FEATURES,
    check_samples,
    detect_format,
    load_samples,
    make_split,
    sample_meta,
    validate_sample,
)


@pytest.fixture(scope="module")
def samples() -> datasets.Dataset:
    return make_split("test", 4, seed=0)


def _png(colour=(200, 20, 20), size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _write_image_files(dataset: datasets.Dataset, folder: Path) -> list[dict]:
    """The samples as plain rows whose image is a file name inside `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in dataset:
        name = f"{row['id']}.png"
        row["image"].save(folder / name)
        rows.append({**row, "image": name, "meta": sample_meta(row)})
    return rows


def _assert_round_trip(result, original: datasets.Dataset, *, same_meta: bool = True) -> None:
    assert result.skipped == [], result.summary()
    assert result.n_loaded == len(original)
    assert result.dataset.features == SAMPLE_FEATURES
    loaded = {row["id"]: row for row in result.dataset}
    for row in original:
        got = loaded[row["id"]]
        assert got["question"] == row["question"]
        assert got["answers"] == row["answers"]
        assert isinstance(got["image"], Image.Image)
        assert np.array_equal(_pixels(got["image"]), _pixels(row["image"]))
        if same_meta:
            assert sample_meta(got) == sample_meta(row)


def test_disk_round_trip(samples, tmp_path):
    samples.save_to_disk(str(tmp_path / "flat"))
    _assert_round_trip(load_samples(tmp_path / "flat"), samples)
    datasets.DatasetDict({"test": samples, "train": samples}).save_to_disk(str(tmp_path / "dict"))
    _assert_round_trip(load_samples(tmp_path / "dict", split="test"), samples)
    with pytest.raises(ValueError, match="split"):
        load_samples(tmp_path / "dict")


def test_parquet_round_trip_with_image_bytes(samples, tmp_path):
    samples.to_parquet(str(tmp_path / "test.parquet"))
    _assert_round_trip(load_samples(tmp_path / "test.parquet"), samples)


def test_parquet_with_image_paths_and_renamed_columns(samples, tmp_path):
    rows = _write_image_files(samples, tmp_path / "imgs")
    renamed = [
        {
            "qid": r["id"],
            "img": f"imgs/{r['image']}",
            "query": r["question"],
            "gold": r["answers"][0],
            "source_note": "renamed",
        }
        for r in rows
    ]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "data.parquet"))
    result = load_samples(
        tmp_path / "data.parquet",
        id_column="qid",
        image_column="img",
        question_column="query",
        answers_column="gold",
    )
    _assert_round_trip(result, samples, same_meta=False)
    assert all(sample_meta(r) == {"source_note": "renamed"} for r in result.dataset)


def test_jsonl_with_paths_mixed_answer_types_and_data_uris(samples, tmp_path):
    rows = _write_image_files(samples, tmp_path / "images")
    mixed = [
        {
            **r,
            "image": f"images/{r['image']}",
            "answers": r["answers"][0] if i % 2 else r["answers"],
        }
        for i, r in enumerate(rows)
    ]
    _assert_round_trip(load_samples(_write_jsonl(tmp_path / "q.jsonl", mixed)), samples)

    inline = []
    for r in rows:
        data = (tmp_path / "images" / r["image"]).read_bytes()
        inline.append({**r, "image": "data:image/png;base64," + base64.b64encode(data).decode()})
    (tmp_path / "inline").mkdir()
    path = _write_jsonl(tmp_path / "inline" / "q.jsonl", inline)
    _assert_round_trip(load_samples(path), samples)


def test_imagefolder_round_trip(samples, tmp_path):
    rows = _write_image_files(samples, tmp_path / "folder")
    metadata = [
        {"file_name": r["image"], "id": r["id"], "question": r["question"], "answers": r["answers"]}
        for r in rows
    ]
    _write_jsonl(tmp_path / "folder" / "metadata.jsonl", metadata)
    assert detect_format(tmp_path / "folder") == "imagefolder"
    _assert_round_trip(load_samples(tmp_path / "folder"), samples, same_meta=False)


def test_llava_round_trip(samples, tmp_path):
    """The LLaVA evaluation layout: questions.jsonl, answers.jsonl and images/, where the
    questions about one image share its file."""
    out = tmp_path / "llava"
    (out / "images").mkdir(parents=True)
    questions, answers = [], []
    for row in samples:
        meta = sample_meta(row)
        name = f"{meta['image_id']}.png"
        row["image"].save(out / "images" / name)
        questions.append({"question_id": row["id"], "image": name, "text": row["question"]})
        answers.append({"question_id": row["id"], "answers": row["answers"], "meta": meta})
    _write_jsonl(out / "questions.jsonl", questions)
    _write_jsonl(out / "answers.jsonl", answers)
    assert len(list((out / "images").iterdir())) < len(samples)
    assert detect_format(out) == "llava"
    _assert_round_trip(load_samples(out), samples)


def test_bad_samples_are_recorded_with_id_and_reason(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows = [
        {"id": "good", "image": "ok.png", "question": "what?", "answers": ["red"]},
        {"id": "gone", "image": "nowhere.png", "question": "what?", "answers": ["red"]},
        {"id": "corrupt", "image": "broken.png", "question": "what?", "answers": ["red"]},
        {"id": "silent", "image": "ok.png", "question": "  ", "answers": ["red"]},
        {"id": "unanswered", "image": "ok.png", "question": "what?", "answers": []},
        {"id": "blank", "image": "ok.png", "question": "what?", "answers": ["", " "]},
        {"id": "good", "image": "ok.png", "question": "again?", "answers": ["red"]},
        {"id": None, "image": "ok.png", "question": "what?", "answers": ["red"]},
        "{this line is not json",
        {"id": "also-good", "image": "ok.png", "question": "what?", "answers": "red"},
    ]
    result = load_samples(_write_jsonl(tmp_path / "bad.jsonl", rows))
    assert result.dataset["id"] == ["good", "also-good"]
    assert result.skip_counts() == {
        "missing_image": 1,
        "unreadable_image": 1,
        "empty_question": 1,
        "no_answers": 2,
        "duplicate_id": 1,
        "missing_id": 1,
        "unreadable_row": 1,
    }
    reasons = {s.id: s.reason for s in result.skipped}
    assert reasons["gone"] == f"missing_image: {tmp_path / 'nowhere.png'}"
    assert reasons["corrupt"].startswith(f"unreadable_image: {tmp_path / 'broken.png'}")
    assert all(s.source == str(tmp_path / "bad.jsonl") for s in result.skipped)
    assert result.n_loaded == 2 and result.n_skipped == 8
    summary = result.summary()
    assert "loaded 2 samples" in summary and "skipped 8" in summary and "no_answers: 2" in summary
    assert "\n" not in summary


def test_one_bad_file_does_not_stop_the_load(samples, tmp_path):
    samples.to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 garbage, not parquet")
    result = load_samples(tmp_path)
    assert result.n_loaded == len(samples)
    assert [s.kind for s in result.skipped] == ["unreadable_file"]
    assert result.skipped[0].source == str(tmp_path / "b.parquet")


def test_a_missing_column_is_reported_not_raised(samples, tmp_path):
    samples.to_parquet(str(tmp_path / "a.parquet"))
    result = load_samples(tmp_path / "a.parquet", question_column="prompt_text")
    assert result.n_loaded == 0
    assert result.skip_counts() == {"missing_column": 1}
    assert "prompt_text" in result.skipped[0].reason


def test_imagefolder_and_llava_report_missing_pieces(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    _write_jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "a.png", "id": "a", "question": "q?", "answers": ["x"]},
            {"file_name": "b.png", "id": "b", "question": "q?", "answers": ["y"]},
        ],
    )
    result = load_samples(folder)
    assert result.dataset["id"] == ["a"]
    assert [(s.id, s.kind) for s in result.skipped] == [("b", "missing_image")]

    with open(folder / "metadata.jsonl", "a") as metadata:
        metadata.write("{not json\n")
    result = load_samples(folder, format="imagefolder")
    assert result.dataset["id"] == ["a"]
    assert sorted(s.kind for s in result.skipped) == ["missing_image", "unreadable_row"]

    llava = tmp_path / "llava"
    (llava / "images").mkdir(parents=True)
    (llava / "images" / "a.png").write_bytes(_png())
    _write_jsonl(
        llava / "questions.jsonl",
        [
            {"question_id": 1, "image": "a.png", "text": "q1?"},
            {"question_id": 2, "image": "a.png", "text": "q2?"},
        ],
    )
    _write_jsonl(
        llava / "answers.jsonl",
        [{"question_id": 1, "answers": ["x"]}, {"question_id": 9, "answers": ["z"]}],
    )
    result = load_samples(llava, format="llava")
    assert result.dataset["id"] == ["1"]
    assert sorted((s.id, s.kind) for s in result.skipped) == [
        ("2", "no_answers"),
        ("9", "no_question"),
    ]


def test_check_samples_filters_an_in_memory_dataset(samples):
    rows = [dict(r) for r in samples.select(range(4))]
    rows[1]["question"] = ""
    rows[2]["answers"] = []
    rows[3]["image"] = {"bytes": b"not an image", "path": None}
    broken = datasets.Dataset.from_list(rows, features=SAMPLE_FEATURES)
    result = check_samples(broken, source="memory")
    assert result.dataset["id"] == [rows[0]["id"]]
    assert result.dataset.features == SAMPLE_FEATURES
    assert isinstance(result.dataset[0]["image"], Image.Image)
    assert [s.kind for s in result.skipped] == ["empty_question", "no_answers", "unreadable_image"]
    assert all(s.source == "memory" for s in result.skipped)
    assert check_samples(samples).n_skipped == 0


def test_validate_sample_reasons(tmp_path):
    good = {"question": "q?", "answers": ["x"], "image": Image.new("RGB", (4, 4))}
    assert validate_sample(good) is None
    assert validate_sample({**good, "question": None}) == "empty_question: question is missing"
    assert validate_sample({**good, "question": 42}) == (
        "bad_question: question must be a string, got int"
    )
    assert validate_sample({**good, "question": "<image> q?"}).startswith("bad_question")
    assert validate_sample({**good, "answers": "  "}) == "no_answers"
    assert validate_sample({**good, "image": None}) == "missing_image"
    assert validate_sample({**good, "image": b"junk"}).startswith("unreadable_image")
    (tmp_path / "x.png").write_bytes(_png())
    assert validate_sample({**good, "image": "x.png"}, image_root=tmp_path) is None


def test_detect_format(samples, tmp_path):
    samples.save_to_disk(str(tmp_path / "disk"))
    samples.to_parquet(str(tmp_path / "p.parquet"))
    _write_jsonl(tmp_path / "q.jsonl", [{"id": "a"}])
    assert detect_format(tmp_path / "disk") == "disk"
    assert detect_format(tmp_path / "p.parquet") == "parquet"
    assert detect_format(tmp_path / "q.jsonl") == "jsonl"


def test_sources_without_an_id_column_get_row_ids(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    rows = [
        {"image": "a.png", "text": f"q{i}?", "answer": "x", "split_name": "val"} for i in range(3)
    ]
    result = load_samples(_write_jsonl(tmp_path / "q.jsonl", rows))
    assert result.dataset["id"] == ["row-0", "row-1", "row-2"]
    assert result.dataset["question"] == ["q0?", "q1?", "q2?"]
    assert sample_meta(result.dataset[0]) == {"split_name": "val"}
    with pytest.raises(ValueError):
        load_samples(tmp_path / "q.jsonl", format="csv")


def test_an_image_shared_by_adjacent_questions_is_decoded_once_and_each_bad_row_is_named(
    samples, monkeypatch
):
    import data.loaders as loaders

    decoded = []
    real = loaders._open_check
    monkeypatch.setattr(loaders, "_open_check", lambda ref: decoded.append(1) or real(ref))
    rows = [dict(r) for r in samples.select(range(8))]  # make_split: 4 questions per image
    bad = {"bytes": b"not an image", "path": None}
    for r in rows[4:6]:
        r["image"] = bad
    result = check_samples(datasets.Dataset.from_list(rows, features=SAMPLE_FEATURES))
    assert len(decoded) == 3  # image 0, the bad image, image 1 again after it
    assert [s.id for s in result.skipped] == [rows[4]["id"], rows[5]["id"]]
    assert result.dataset["id"] == [r["id"] for r in rows[:4] + rows[6:]]
