import json

import datasets
import numpy as np
import pytest
from datasets import Dataset

from data.schema import SAMPLE_FEATURES
from data.synthetic import make_split, vocabulary
from m3core import MICRO, tiny_lmm
from pipelines.batch import RunJob, run_dataset
from pipelines.cli import main
from pipelines.labelling import LabelJob, run_labelling
from pipelines.labels import read_labels
from pipelines.routing import calibration_scores, train_router, tune_router
from predictor import ScaleRouter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    rows = make_split("calib", 6, seed=1, image_size=32).to_list()
    bad = {**rows[1], "id": "bad-no-answers", "answers": []}
    Dataset.from_list([*rows, bad], features=SAMPLE_FEATURES).save_to_disk(str(root / "data"))
    tiny_lmm(vocabulary(), MICRO, seed=0).save_pretrained(root / "model")
    return root


def run_job(inputs, out, **overrides) -> RunJob:
    values = {
        "model": str(inputs / "model"),
        "data": str(inputs / "data"),
        "out": str(inputs / out),
        "shard_size": 5,
        "batch_size": 4,
        "max_new_tokens": 3,
    }
    return RunJob(**{**values, **overrides})


def test_fixed_scale_run_answers_every_sample_once_and_records_the_bad_one(inputs):
    summary = run_dataset(run_job(inputs, "fixed", scale="4"), progress=False)
    out = inputs / "fixed"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert summary["samples"] == len(records) == 24
    assert summary["skipped"] == 1 and summary["scale_counts"] == {"4": 24}
    assert {r["visual_tokens"] for r in records} == {4}
    assert all("score" in r and "correct" in r for r in records)
    assert datasets.load_from_disk(str(out / "results"))["id"] == [r["id"] for r in records]
    skipped = json.loads((out / "skipped.jsonl").read_text().splitlines()[0])
    assert skipped["id"] == "bad-no-answers" and "no_answers" in skipped["reason"]


def test_run_resumes_without_recomputing(inputs):
    first = run_dataset(run_job(inputs, "resume", scale="1"), progress=False)
    shard = inputs / "resume" / "shards" / "shard-00000" / "results.jsonl"
    stamp = shard.stat().st_mtime_ns
    again = run_dataset(run_job(inputs, "resume", scale="1"), progress=False)
    assert shard.stat().st_mtime_ns == stamp
    assert again["samples"] == first["samples"] and again["samples_per_s"] is None
    with pytest.raises(ValueError, match="scale"):
        run_dataset(run_job(inputs, "resume", scale="4"), progress=False)


def test_run_refuses_to_resume_on_a_model_retrained_in_place(inputs, tmp_path):
    model = tmp_path / "model"
    tiny_lmm(vocabulary(), MICRO, seed=0).save_pretrained(model)
    job = run_job(inputs, str(tmp_path / "out"), model=str(model), scale="1", limit=4)
    run_dataset(job, progress=False)
    tiny_lmm(vocabulary(), MICRO, seed=1).save_pretrained(model)
    with pytest.raises(ValueError, match="model weights"):
        run_dataset(job, progress=False)


def test_routed_run_with_a_budget_through_the_cli(inputs, capsys):
    run_labelling(
        LabelJob(
            model=str(inputs / "model"),
            data=str(inputs / "data"),
            out=str(inputs / "labels"),
            shard_size=12,
            max_new_tokens=3,
        ),
        progress=False,
    )
    labels = read_labels(inputs / "labels")
    trained = train_router(labels, inputs / "router", [{"estimator": "logreg"}], cv=2)
    router = trained.router
    served = ScaleRouter.load(inputs / "router")
    held_out = calibration_scores(served, labels, inputs / "router")
    np.testing.assert_allclose(held_out, trained.oof_proba, atol=1e-6)
    other = labels.subset(np.arange(10))
    np.testing.assert_allclose(
        calibration_scores(served, other, inputs / "router"),
        router.predict_proba(other.features),
        atol=1e-5,
    )
    tune_router(labels, inputs / "router", "tokens<=8", "utility")
    code = main(
        [
            "run",
            "--model",
            str(inputs / "model"),
            "--data",
            str(inputs / "data"),
            "--out",
            str(inputs / "routed"),
            "--router",
            str(inputs / "router"),
            "--budget",
            "tokens<=4",
            "--workers",
            "0",
            "--max-new-tokens",
            "3",
        ]
    )
    assert code == 0
    summary = json.loads((inputs / "routed" / "summary.json").read_text())
    assert summary["samples"] == 24 and summary["mean_visual_tokens"] <= 16
    assert (inputs / "router" / "drift.json").is_file()  # written where the knob is tuned
    assert summary["drift"]["n"] == 24 and 0 <= summary["drift"]["score"] <= 1
    lines = (inputs / "routed" / "results.jsonl").read_text().splitlines()
    assert {json.loads(line)["routed_by"] for line in lines} <= {"router", "fixed"}


def test_cli_reports_bad_arguments_without_a_traceback(inputs, capsys):
    code = main(
        [
            "run",
            "--model",
            str(inputs / "nowhere"),
            "--data",
            str(inputs / "data"),
            "--out",
            str(inputs / "x"),
            "--workers",
            "0",
        ]
    )
    assert code == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_jobs_take_a_shipped_checkpoint_by_name(tmp_path):
    """`--model tiny-m3` works for label and run as for the quickstart; the job records the
    folder, whose weights a resumed run is checked against."""
    from m3core.shipped import SHIPPED
    from pipelines.batch import RunJob
    from pipelines.labelling import LabelJob

    shipped = str(SHIPPED / "tiny-m3")
    assert LabelJob(model="tiny-m3", data="d", out=str(tmp_path)).model == shipped
    assert RunJob(model="tiny-m3", data="d", out=str(tmp_path), scale="9").model == shipped
    assert LabelJob(model="no/such/folder", data="d", out=str(tmp_path)).model == "no/such/folder"
