"""Every `adaptive-m3` subcommand on micro data, through `main`: what it writes and what it prints.

One chain of module fixtures, each command run once: make-benchmark -> label (the shipped
tiny-m3) -> train-router -> tune, then granularity and run on those labels; train-lmm on a
micro recipe; quickstart --small. Printed numbers are checked against the files, and those
against an independent path where there is one (labels vs a fixed-scale run).
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from data import load_samples, make_split, sample_meta
from m3core import MICRO
from m3core.lmm import NestedLMM
from m3core.shipped import resolve_model
from pipelines.cli import main
from pipelines.labels import read_labels

SIZES = {"train": 4, "calib": 6, "test": 3}  # images; 4 questions each
MODEL = str(resolve_model("tiny-m3"))


def cli(*args: str) -> str:
    """Run one subcommand; it must succeed. Returns what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([str(a) for a in args])
    assert code == 0, out.getvalue()
    return out.getvalue()


def printed_json(text: str) -> dict:
    """The indented JSON object a command printed after any plain lines."""
    return json.loads(text[re.search(r"^\{", text, re.MULTILINE).start() :])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def bench(work) -> tuple[Path, str]:
    sizes = ",".join(f"{k}={v}" for k, v in SIZES.items())
    return work / "bench", cli("make-benchmark", "--out", work / "bench", "--sizes", sizes)


@pytest.fixture(scope="module")
def labelled(work, bench) -> tuple[Path, str]:
    out = work / "labels"
    printed = cli(
        "label", "--model", MODEL, "--data", bench[0] / "calib", "--out", out,
        "--workers", 0, "--shard-size", 8, "--probe-scales", 1,
    )  # fmt: skip
    return out, printed


@pytest.fixture(scope="module")
def router(work, labelled) -> tuple[Path, str, str]:
    """train-router, then tune on the same labels: (router folder, what each printed)."""
    out = work / "router"
    trained = cli("train-router", "--labels", labelled[0], "--out", out, "--cv", 2)
    tuned = cli(
        "tune", "--labels", labelled[0], "--router", out, "--target", "tokens<=20",
        "--report", work / "tune-report",
    )  # fmt: skip
    return out, trained, tuned


def test_make_benchmark_prints_each_split_folder_and_writes_the_seeded_splits(bench):
    folder, printed = bench
    assert printed.splitlines() == [f"{split}: {folder / split}" for split in SIZES]
    manifest = json.loads((folder / "benchmark.json").read_text())
    assert manifest["sizes"] == SIZES and manifest["seed"] == 0
    for split, n_images in SIZES.items():
        loaded = load_samples(folder / split)
        assert loaded.n_loaded == 4 * n_images and loaded.n_skipped == 0
        assert {sample_meta(r)["split"] for r in loaded.dataset.select_columns(["meta"])} == {split}
    assert (
        load_samples(folder / "calib").dataset["question"] == make_split("calib", 6, 0)["question"]
    )


def test_train_lmm_announces_each_stage_writes_each_run_and_resumes(bench, work):
    recipe = {
        "name": "micro",
        "model": MICRO.__dict__,
        "stages": [
            {
                "name": "tune-{n}",
                "type": "matryoshka",
                "repeat": 2,
                "seeds": [0, 1],
                "steps": 2,
                "batch_size": 2,
                "eval_every": 2,
                "eval_samples": 4,
            }
        ],
    }
    # the micro tower is 32 px: it reads the 96 px benchmark through its image processor
    (work / "micro.json").write_text(json.dumps(recipe))
    out = work / "micro-model"
    args = ("train-lmm", "--config", work / "micro.json", "--data", bench[0] / "train")
    printed = cli(*args, "--eval-data", bench[0] / "calib", "--eval-samples", 4, "--out", out)
    lines = printed.splitlines()
    assert lines[0] == f"loaded 16 samples from {bench[0] / 'train'}, skipped 0"
    assert f"stage 1/2: tune-1 (matryoshka) -> {out / '00-tune-1'}" in lines
    assert f"stage 2/2: tune-2 (matryoshka) -> {out / '01-tune-2'}" in lines
    assert lines[-1] == f"model: {out / 'model'}"
    assert NestedLMM.from_pretrained(out / "model", device="cpu").scales == (1, 4, 16)
    log = (out / "01-tune-2" / "train_log.jsonl").read_text().splitlines()
    assert set(json.loads(log[-1])["eval_accuracy"]) == {"1", "4", "16"}
    assert set(json.loads((out / "timings.json").read_text())) == {"tune-1", "tune-2", "device"}
    weights = (out / "01-tune-2" / "model" / "model.safetensors").stat().st_mtime_ns
    again = cli(*args, "--out", out)
    assert "stage " not in again  # both runs are done: resumed, nothing retrained
    assert (out / "01-tune-2" / "model" / "model.safetensors").stat().st_mtime_ns == weights


def test_label_prints_the_per_scale_accuracy_of_the_labels_it_wrote(bench, labelled):
    out, printed = labelled
    labels = read_labels(out)
    lines = printed.splitlines()
    assert lines[0] == f"loaded 24 samples from {bench[0] / 'calib'}, skipped 0"
    assert lines[1] == f"labelled 24 samples (0 skipped) into {out}"
    assert labels.ids == load_samples(bench[0] / "calib").dataset["id"]
    assert labels.scales == (1, 9, 36, 144)
    assert labels.probe_scales == (1,)
    assert len(list((out / "shards").glob("shard-*"))) == 3
    summary = json.loads(lines[2])
    assert summary["n"] == 24
    for s, accuracy in zip(labels.scales, labels.correct.mean(0), strict=True):
        assert summary["accuracy"][str(s)] == pytest.approx(accuracy)
    assert summary["oracle"]["accuracy"] == pytest.approx(labels.correct.any(1).mean())


def test_granularity_prints_the_table_it_writes(labelled, work):
    out = work / "granularity"
    printed = cli("granularity", "--labels", labelled[0], "--out", out)
    labels = read_labels(labelled[0])
    cells = " | ".join(f"{100 * a:.1f}" for a in labels.correct.mean(0))
    assert f"| **all** | 24 | {cells} | {100 * labels.correct.any(1).mean():.1f} |" in printed
    assert (out / "granularity.md").read_text() in printed
    written = printed.splitlines()[-1].removeprefix("wrote ").split(", ")
    assert {Path(p).name for p in written} >= {"granularity.json", "granularity.md", "curve.png"}
    assert all(Path(p).is_file() for p in written)
    assert json.loads((out / "granularity.json").read_text())["all"]["n"] == 24


def test_train_router_prints_each_candidates_cv_score_and_marks_the_chosen(router):
    folder, printed, _ = router
    report = json.loads((folder / "cv_report.json").read_text())
    lines = printed.splitlines()
    assert lines[0].startswith(f"cross-validation (2 folds, 24 samples): {report['metric']}")
    rows = lines[1 : 1 + len(report["candidates"])]
    for i, (row, candidate) in enumerate(zip(rows, report["candidates"], strict=True)):
        mark = "*" if i == report["best_index"] else " "
        score = f"{candidate['fold_log_loss_mean']:.4f} +- {candidate['fold_log_loss_se']:.4f}"
        assert row == f"{mark} {score}  {json.dumps(candidate['params'])}"
    chosen = report["candidates"][report["best_index"]]["params"]
    stored = json.loads((folder / "router.json").read_text())
    assert stored["estimator"] == chosen["estimator"]
    assert lines[-1].startswith(f"router: ScaleRouter(estimator={chosen['estimator']!r}")
    assert lines[-1].endswith(f" -> {folder}") and (folder / "model.onnx").is_file()


def test_tune_prints_the_knob_it_stores_within_the_budget(router, work):
    folder, _, printed = router
    report_lines = [line for line in printed.splitlines() if line.startswith("wrote ")]
    result = json.loads(printed[: printed.index("\nwrote ")])
    stored = json.loads((folder / "router.json").read_text())
    assert (stored["policy"], stored["knob"]) == (result["policy"], result["knob"])
    assert result["metrics"]["mean_tokens"] <= 20  # on the calib split it was tuned on
    assert (folder / "calibration.json").is_file()
    written = [Path(p) for p in report_lines[0].removeprefix("wrote ").split(", ")]
    assert written and all(p.is_file() and p.parent == work / "tune-report" for p in written)


def test_probe_router_trains_then_tunes_on_its_parts_held_out_scores(labelled, work):
    """`train-router --probe probe-cascade` writes a gate and one part per probe scale; `tune`
    on that folder chooses the knob on each part's stored out-of-fold scores, the same knob
    `predictor.tune` gives on those scores read straight from the files."""
    from pipelines.routing import GATE_DIR, OOF_JSON, probe_calibration_scores
    from predictor import ProbeRouter, ProbeScores, tune
    from predictor.routers.probe_router import PROBE_JSON, stage_dir

    folder = work / "probe-router"
    trained = cli("train-router", "--labels", labelled[0], "--out", folder, "--cv", 2,
                  "--probe", "probe-cascade")  # fmt: skip
    router = ProbeRouter.load(folder)
    assert (
        trained.strip()
        .splitlines()[-1]
        .startswith(f"probe router (probe-cascade, gate threshold {router.gate_threshold:g}; gate ")
    )
    assert list(router.stages) == [1]
    tuned = json.loads(cli("tune", "--labels", labelled[0], "--router", folder,
                           "--target", "tokens<=20"))  # fmt: skip
    stored = json.loads((folder / PROBE_JSON).read_text())
    assert (
        (stored["policy"], stored["knob"])
        == (tuned["policy"], tuned["knob"])
        == (
            "probe-cascade",
            ProbeRouter.load(folder).knob,
        )
    )

    labels = read_labels(labelled[0])

    def held_out(part: Path) -> np.ndarray:
        oof = json.loads((part / OOF_JSON).read_text())
        assert oof["ids"] == list(labels.ids)
        return np.asarray(oof["proba"])

    gate, stage = held_out(folder / GATE_DIR), held_out(folder / stage_dir(1))
    scores = probe_calibration_scores(router, labels, folder)
    assert np.array_equal(scores.gate, gate) and np.array_equal(scores.stages[0], stage)
    expected = tune(
        ProbeScores({0: stage}, gate, router.gate_threshold),
        labels.correct,
        labels.scales,
        labels.costs(),
        "tokens<=20",
        "probe-cascade",
        "largest",
    )
    assert expected.knob == tuned["knob"]


def test_run_at_a_fixed_scale_answers_as_labelling_did(bench, labelled, work):
    out = work / "run-9"
    printed = cli(
        "run", "--model", MODEL, "--data", bench[0] / "calib", "--out", out, "--scale", 9,
        "--workers", 0,
    )  # fmt: skip
    summary = printed_json(printed)
    assert summary == json.loads((out / "summary.json").read_text())
    labels = read_labels(labelled[0])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == labels.ids
    assert [r["answer"] for r in records] == [a[1] for a in labels.answers]
    assert summary["accuracy"] == pytest.approx(labels.correct[:, 1].mean())
    assert summary["samples"] == 24 and summary["skipped"] == 0
    assert summary["scale_counts"] == {"9": 24} and summary["mean_visual_tokens"] == 9


def test_run_routed_within_a_budget_answers_each_sample_at_its_chosen_scale(
    bench, labelled, router, work
):
    out = work / "run-routed"
    printed = cli(
        "run", "--model", MODEL, "--data", bench[0] / "calib", "--out", out,
        "--router", router[0], "--budget", "tokens<=20", "--workers", 0,
    )  # fmt: skip
    summary = printed_json(printed)
    labels = read_labels(labelled[0])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["routed_by"] for r in records} == {"router"}
    index = {s: i for i, s in enumerate(labels.scales)}
    assert [r["answer"] for r in records] == [
        answers[index[r["scale"]]] for r, answers in zip(records, labels.answers, strict=True)
    ]
    assert summary["mean_visual_tokens"] == pytest.approx(np.mean([r["scale"] for r in records]))
    scales, counts = np.unique([r["scale"] for r in records], return_counts=True)
    assert summary["scale_counts"] == {str(s): int(n) for s, n in zip(scales, counts, strict=True)}


def test_quickstart_small_prints_its_report_and_writes_it(work):
    out = work / "quickstart"
    printed = cli("quickstart", "--small", "--workers", 0, "--out", out)
    report = json.loads((out / "report.json").read_text())
    labels = read_labels(out / "labels-test")
    for s, accuracy in zip(labels.scales, labels.correct.mean(0), strict=True):
        assert report["fixed"][str(s)]["accuracy"] == pytest.approx(accuracy)
        assert f"| fixed {s} | {100 * accuracy:.1f} | {s:.1f} |" in printed
    assert report["oracle"]["accuracy"] == pytest.approx(labels.correct.any(1).mean())
    assert (out / "report.md").read_text().strip() in printed
    assert re.search(rf"wrote {re.escape(str(out))}/report.json, report.md, pareto.png", printed)
    assert (out / "pareto.png").stat().st_size > 0
    assert (out / "router" / "router.json").is_file()


def test_help_imports_no_model_or_router_library():
    """`adaptive-m3 --help` stays instant: building the parser imports neither torch nor
    scikit-learn, SciPy or ONNX (predictor's names load on first use)."""
    import subprocess
    import sys

    heavy = ["torch", "transformers", "sklearn", "scipy", "onnx", "onnxruntime", "ray"]
    script = (
        "import sys, contextlib, io\n"
        "from pipelines.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['quickstart', '--help'])\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
