"""`adaptive-m3 lmms-task` writes an lmms-eval task that asks and scores like the preset, and
`label` / `run` take their metric from the preset (no lmms-eval needed here)."""

from __future__ import annotations

import importlib.util

import datasets
import pytest
import yaml
from PIL import Image

from data import load_samples
from pipelines.batch import RunJob
from pipelines.cli import main
from pipelines.labelling import LabelJob, prepare_samples

ROWS = [
    {"questionId": "q1", "question": "What is the total?", "answers": ["$1.00"], "docId": 1,
     "image": Image.new("RGB", (12, 10), (200, 20, 20))},
    {"questionId": "q2", "question": "Who signed?", "answers": ["J. Smith"], "docId": 1,
     "image": Image.new("RGB", (12, 10), (20, 20, 200))},
]  # fmt: skip


@pytest.fixture
def docvqa(tmp_path):
    path = tmp_path / "docvqa" / "validation.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    return path


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor(
    "!function", lambda loader, node: ("function", loader.construct_scalar(node))
)


def test_lmms_task_asks_and_scores_like_the_preset(docvqa, tmp_path):
    out = tmp_path / "tasks"
    assert main(["lmms-task", "--data", str(docvqa.parent), "--out", str(out),
                 "--preset", "docvqa"]) == 0  # fmt: skip
    config = yaml.load((out / "adaptive_m3_docvqa.yaml").read_text(), Loader=_Loader)
    assert config["dataset_kwargs"]["data_files"]["test"] == [str(docvqa.resolve())]
    assert config["process_results"] == ("function", "utils.process_results")
    assert config["metadata"]["metric"] == "anls"
    spec = importlib.util.spec_from_file_location("written_utils", out / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    loaded = load_samples(docvqa, preset="docvqa").dataset
    for row, sample in zip(ROWS, loaded, strict=True):
        assert utils.doc_to_text(row) == sample["question"]
        assert utils.doc_to_target(row) == sample["answers"]
        assert utils.doc_to_visual(row)[0].size == row["image"].size
    assert utils.process_results(ROWS[0], ["$1.0"]) == {"score": pytest.approx(0.8)}
    # a row the preset cannot read is asked nothing (the model records it as skipped)
    assert utils.doc_to_text({"questionId": "q3"}) == ""
    assert utils.doc_to_target({"questionId": "q3", "question": "x"}) == []
    assert utils.doc_to_visual({"questionId": "q3"}) == []


def test_label_and_run_take_the_metric_from_the_preset(docvqa, tmp_path):
    job = LabelJob(model="tiny-m3", data=str(docvqa), out=str(tmp_path / "l"), preset="docvqa")
    assert job.metric == "anls"
    samples = prepare_samples(job)
    assert samples["id"] == ["q1", "q2"]
    assert samples[0]["question"].endswith("Answer the question using a single word or phrase.")
    assert RunJob(model="m", data="d", out="o", preset="pope").metric == "yesno"
    assert RunJob(model="m", data="d", out="o", preset="pope", metric="exact").metric == "exact"
    assert LabelJob(model="m", data="d", out="o").metric == "vqa"
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        LabelJob(model="m", data="d", out="o", metric="f1")
    with pytest.raises(ValueError, match="unknown preset"):
        RunJob(model="m", data="d", out="o", preset="okvqa")
